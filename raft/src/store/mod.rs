//! Durable storage of the Raft group on sled: the log store (entries, vote,
//! committed id) and the state machine with its snapshots. One sled database
//! per node holds both, in separate trees.

// openraft's storage traits require `StorageError` as the error type, large
// as it is; the helpers here return what the traits return.
#![allow(clippy::result_large_err)]

mod log;
mod state_machine;

use std::path::Path;

pub use log::LogStore;
use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageError, StorageIOError};
pub use state_machine::{Applied, StateMachineStore};

use crate::NodeId;

/// Opens (or creates) the node's database under `dir` and the two stores on it.
pub async fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StorageError<NodeId>> {
    let db = sled::Config::new()
        .path(dir)
        // Raft flushes explicitly before it acknowledges; no background flush is needed.
        .flush_every_ms(None)
        .open()
        .map_err(|e| StorageIOError::new(ErrorSubject::Store, ErrorVerb::Read, AnyError::new(&e)))?;
    let log = LogStore::new(&db)?;
    let sm = StateMachineStore::new(&db).await?;
    Ok((log, sm))
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(v)
}
