//! The sled stores against openraft's own storage test suite, and across a
//! reopen of the same directory (what a node restart does).

use std::sync::Arc;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{BasicNode, Entry, EntryPayload, LogId, Membership, RaftLogReader, RaftSnapshotBuilder, StorageError, Vote};
use raftlb_proto::spec::Spec;
use raftlb_raft::store::{self, LogStore, StateMachineStore};
use raftlb_raft::{Command, NodeId, TypeConfig};
use tempfile::TempDir;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = TempDir::new().expect("a temporary directory");
        let (log, sm) = store::open(dir.path()).await?;
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_store_passes_the_openraft_suite() {
    if let Err(e) = Suite::test_all(SledBuilder) {
        panic!("openraft's storage suite failed: {e}");
    }
}

fn entry(term: u64, index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
    Entry { log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index), payload }
}

fn spec(backend: &str) -> Arc<Spec> {
    Arc::new(Spec::from_yaml(&format!("backends: [{{ name: {backend} }}]")).unwrap())
}

#[tokio::test]
async fn log_vote_and_snapshot_survive_a_reopen() {
    let dir = TempDir::new().unwrap();
    let members = Membership::new(
        vec![[1].into()],
        [(1u64, BasicNode::new("127.0.0.1:1"))].into_iter().collect::<std::collections::BTreeMap<_, _>>(),
    );
    let entries = vec![
        entry(1, 1, EntryPayload::Membership(members)),
        entry(1, 2, EntryPayload::Normal(Command::ApplySpec { spec: spec("a"), at_ms: 1 })),
        entry(1, 3, EntryPayload::Normal(Command::ApplySpec { spec: spec("b"), at_ms: 2 })),
    ];
    {
        let (mut log, mut sm) = store::open(dir.path()).await.unwrap();
        log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        sm.apply(entries[..2].to_vec()).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        sm.apply(entries[2..].to_vec()).await.unwrap();
    }

    let (mut log, mut sm) = store::open(dir.path()).await.unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(1, 1)));
    let back = log.try_get_log_entries(1..4).await.unwrap();
    assert_eq!(back.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![1, 2, 3]);

    // The state machine restarts from the snapshot; openraft replays entry 3.
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(2));
    assert_eq!(membership.membership().voter_ids().collect::<Vec<_>>(), vec![1]);
    let state = sm.subscribe().borrow().clone();
    assert_eq!(state.state.config_version(), 1);
    assert_eq!(state.state.current().unwrap().spec, spec("a"));
    assert_eq!(state.state.nodes.keys().copied().collect::<Vec<_>>(), vec![1]);
}
