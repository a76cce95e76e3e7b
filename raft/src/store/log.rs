//! The Raft log on sled. Entries are keyed by big-endian index so that sled's
//! key order is log order. Every append and vote is flushed to disk before it
//! is acknowledged: a vote or an entry that was acknowledged survives a crash.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, Entry, ErrorSubject, ErrorVerb, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::json;
use crate::{NodeId, TypeConfig};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    entries: sled::Tree,
    meta: sled::Tree,
}

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

fn io_err(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

impl LogStore {
    pub(super) fn new(db: &sled::Db) -> Result<Self> {
        let open = |name: &str| db.open_tree(name).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e));
        Ok(LogStore { db: db.clone(), entries: open("log")?, meta: open("log_meta")? })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let Some(bytes) = self.meta.get(key).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let bytes = json(value).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        self.meta.insert(key, bytes).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn flush(&self, subject: ErrorSubject<NodeId>) -> Result<()> {
        self.db.flush_async().await.map_err(|e| io_err(subject, ErrorVerb::Write, e))?;
        Ok(())
    }

    /// Removes the entries with index in `range`.
    fn remove(&self, from: u64, to_inclusive: u64) -> Result<()> {
        let mut batch = sled::Batch::default();
        for key in self.entries.range(from.to_be_bytes()..=to_inclusive.to_be_bytes()).keys() {
            batch.remove(key.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?);
        }
        self.entries.apply_batch(batch).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(&mut self, range: RB) -> Result<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for kv in self.entries.range(start.to_be_bytes()..) {
            let (key, value) = kv.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let index = u64::from_be_bytes(key.as_ref().try_into().expect("log keys are 8 bytes"));
            if !range.contains(&index) {
                break;
            }
            out.push(serde_json::from_slice(&value).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(LAST_PURGED)?;
        let last = match self.entries.last().map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))? {
            Some((_, value)) => {
                let entry: Entry<TypeConfig> =
                    serde_json::from_slice(&value).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        self.put_meta(VOTE, vote)?;
        self.flush(ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        // Not flushed: losing it only means re-learning the commit index from the leader.
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = json(&entry).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            batch.insert(&entry.log_id.index.to_be_bytes(), bytes);
        }
        self.entries.apply_batch(batch).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        let flushed = self.db.flush_async().await.map(|_| ()).map_err(std::io::Error::other);
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        self.remove(log_id.index, u64::MAX)?;
        self.flush(ErrorSubject::Logs).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        // Record the purge point first: entries at or below it are ignored even
        // if a crash leaves some of them behind.
        self.put_meta(LAST_PURGED, &log_id)?;
        self.flush(ErrorSubject::Logs).await?;
        self.remove(0, log_id.index)
    }
}
