//! The state machine: the [`ClusterState`] in memory, rebuilt at start from
//! the last snapshot on sled plus the committed log entries openraft replays.
//! Every applied batch is published on a watch channel, so readers (the admin
//! API, later the data plane) see each committed state without locking.

use std::io::Cursor;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::json;
use crate::state::{ClusterState, CommandResult};
use crate::{NodeId, TypeConfig};

const CURRENT: &str = "current";

/// Everything applied up to `last_applied`: the unit a snapshot holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub state: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

pub struct StateMachineStore {
    snapshot_file: SnapshotFile,
    applied: Applied,
    published: watch::Sender<Arc<Applied>>,
}

impl StateMachineStore {
    pub(super) async fn new(db: &sled::Db) -> Result<Self> {
        let snapshot_file = SnapshotFile::open(db)?;
        let applied = match snapshot_file.read()? {
            Some(stored) => decode(&stored.meta, &stored.data)?,
            None => Applied::default(),
        };
        let published = watch::channel(Arc::new(applied.clone())).0;
        Ok(StateMachineStore { snapshot_file, applied, published })
    }

    /// A receiver that always holds the latest applied state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Applied>> {
        self.published.subscribe()
    }

    fn publish(&self) {
        self.published.send_replace(Arc::new(self.applied.clone()));
    }
}

/// The last snapshot, persisted in its own sled tree.
#[derive(Clone)]
struct SnapshotFile {
    db: sled::Db,
    tree: sled::Tree,
}

impl SnapshotFile {
    fn open(db: &sled::Db) -> Result<Self> {
        let tree =
            db.open_tree("snapshot").map_err(|e| StorageIOError::new(ErrorSubject::Snapshot(None), ErrorVerb::Read, AnyError::new(&e)))?;
        Ok(SnapshotFile { db: db.clone(), tree })
    }

    fn read(&self) -> Result<Option<StoredSnapshot>> {
        let read_err = |e: &dyn std::error::Error| StorageIOError::read_snapshot(None, AnyError::error(e.to_string()));
        let Some(bytes) = self.tree.get(CURRENT).map_err(|e| read_err(&e))? else {
            return Ok(None);
        };
        Ok(Some(serde_json::from_slice(&bytes).map_err(|e| read_err(&e))?))
    }

    /// Persists and flushes: a snapshot replaces log entries that may be purged next.
    async fn write(&self, snapshot: &StoredSnapshot) -> Result<()> {
        let write_err =
            |e: &dyn std::error::Error| StorageIOError::write_snapshot(Some(snapshot.meta.signature()), AnyError::error(e.to_string()));
        let bytes = json(snapshot).map_err(|e| write_err(&e))?;
        self.tree.insert(CURRENT, bytes).map_err(|e| write_err(&e))?;
        self.db.flush_async().await.map_err(|e| write_err(&e))?;
        Ok(())
    }
}

fn decode(meta: &SnapshotMeta<NodeId, BasicNode>, data: &[u8]) -> Result<Applied> {
    serde_json::from_slice(data).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e)).into())
}

/// Builds a snapshot from a copy of the state taken when the build was asked for.
pub struct SnapshotBuilder {
    applied: Applied,
    snapshot_file: SnapshotFile,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let data = json(&self.applied).map_err(|e| StorageIOError::read_state_machine(AnyError::new(&e)))?;
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let snapshot_id = match self.applied.last_applied {
            Some(id) => format!("{}-{}-{nanos}", id.leader_id, id.index),
            None => format!("none-{nanos}"),
        };
        let meta = SnapshotMeta { last_log_id: self.applied.last_applied, last_membership: self.applied.membership.clone(), snapshot_id };
        let stored = StoredSnapshot { meta: meta.clone(), data };
        self.snapshot_file.write(&stored).await?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(stored.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        for entry in entries {
            self.applied.last_applied = Some(entry.log_id);
            let result = match &entry.payload {
                EntryPayload::Blank => CommandResult::Done,
                EntryPayload::Normal(cmd) => self.applied.state.apply(cmd),
                EntryPayload::Membership(m) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    self.applied.state.apply_membership(m);
                    CommandResult::Done
                }
            };
            results.push(result);
        }
        self.publish();
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { applied: self.applied.clone(), snapshot_file: self.snapshot_file.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<NodeId, BasicNode>, snapshot: Box<Cursor<Vec<u8>>>) -> Result<()> {
        let data = snapshot.into_inner();
        let applied = decode(meta, &data)?;
        self.snapshot_file.write(&StoredSnapshot { meta: meta.clone(), data }).await?;
        self.applied = applied;
        self.publish();
        tracing::info!(up_to = ?meta.last_log_id.map(|l| l.index), "installed a snapshot sent by the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        Ok(self.snapshot_file.read()?.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}
