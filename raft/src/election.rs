//! Elections, run here rather than by openraft's own timer, for two things
//! openraft 0.9 lacks:
//!
//! - A pre-vote. Before a node raises its term it asks the voters whether
//!   they would vote for it. A node cut off from the group hears no yes, so
//!   it never raises its term, and when it comes back it does not unseat the
//!   leader that took over meanwhile (which would move the VIPs once more).
//! - Timing tied to the voters' lease. openraft's voters refuse every
//!   candidate for a lease after their leader's last heartbeat, and its timer
//!   stands only a whole election timeout after that lease. Here a follower
//!   stands as soon as the lease ran out on a quorum, the followers in turn,
//!   so a crashed leader is replaced within about `election_timeout_min`
//!   of its last heartbeat.
//!
//! The lease itself stays openraft's (a voter checks it on every vote): it
//! is what keeps a new leader from being elected while the old one may
//! still hold the VIPs (docs/fencing.md).

use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use openraft::{LogId, ServerState};
use raftlb_proto::raft::raft_transport_client::RaftTransportClient;
use raftlb_proto::raft::Payload;
use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, Handover, DRAINED_STANDS_AFTER};
use crate::NodeId;

/// The longest the election loop sleeps with no deadline due and nothing
/// changed: a safety net, as every input it reads wakes it when it changes.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// How far past its own lease a follower waits before it stands: the other
/// voters took the leader's last heartbeat a little later than it did.
const STAND_MARGIN: Duration = Duration::from_millis(10);

/// Up to this much is added at random to each wait, so that two nodes that
/// collided once do not collide again.
const JITTER: Duration = Duration::from_millis(10);

/// After a pre-vote without a quorum, how soon a node asks again: a voter
/// that said no because it heard the leader a moment ago may say yes soon.
const PRE_VOTE_RETRY: Duration = Duration::from_millis(20);

/// How long a pre-vote waits for a voter's answer.
const PRE_VOTE_TIMEOUT: Duration = Duration::from_millis(50);

/// A pre-vote: would the receiver vote for `candidate` if it stood now?
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PreVote {
    pub candidate: NodeId,
    pub last_log: Option<LogId<NodeId>>,
}

/// A random duration below `max`.
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    Duration::from_micros(random % (max.as_micros() as u64).max(1))
}

impl Cluster {
    /// How long after the last heartbeat it accepted a voter refuses to vote
    /// for anyone else: `election_timeout_min`, which this crate hands to
    /// openraft as the lease it enforces on every vote.
    pub(crate) fn voter_lease(&self) -> Duration {
        self.settings().election_timeout_min
    }

    /// How long this follower waits after the leader's last heartbeat before
    /// it stands: the lease, a margin, and its turn. The followers are ranked
    /// by id without the leader they followed; turns are spread over the
    /// election timeout's range, so the last one stands before its maximum.
    fn stand_after(&self, voters: &[NodeId], last_leader: Option<NodeId>) -> Duration {
        let me = self.id();
        let settings = self.settings();
        let rank = voters.iter().filter(|v| **v < me && Some(**v) != last_leader).count() as u32;
        let turn = (settings.election_timeout_max - settings.election_timeout_min) / voters.len().max(1) as u32;
        self.voter_lease() + STAND_MARGIN + turn * rank + jitter(JITTER)
    }

    /// Stands for election when the leader has been silent for this node's
    /// turn, and a quorum of voters says in a pre-vote that it would vote.
    /// Runs for the node's lifetime.
    pub(crate) async fn run_elections(self) {
        let me = self.id();
        let started = Instant::now();
        // Leadership and membership only: the full metrics change with every heartbeat.
        let mut server = self.raft().server_metrics();
        // A drain or its end.
        let mut applied = self.subscribe();
        let mut last_leader = None;
        let mut leading = false;
        let mut led_until = None;
        // The leader's last heartbeat this node took, and when it stands if
        // none follows.
        let mut silent_since = None;
        let mut stand_at = started;
        let mut next_try = started;
        // When to look again if nothing changes first: a heartbeat that came
        // in meanwhile only moves the time to stand on.
        let mut wake = started;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                changed = server.changed() => if changed.is_err() { return },
                changed = applied.changed() => if changed.is_err() { return },
                _ = self.hold_changed().notified() => {}
            }
            let now = Instant::now();
            wake = now + IDLE_LOOK;
            if self.raft().metrics().borrow().running_state.is_err() {
                return;
            }
            let (state, leader, voters) = {
                let m = server.borrow_and_update();
                let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
                (m.state, m.current_leader, voters)
            };
            if let Some(leader) = leader.filter(|l| *l != me) {
                last_leader = Some(leader);
            }
            // Having led counts as having heard a leader: a node that just
            // handed over waits its turn like every other follower.
            if state == ServerState::Leader {
                leading = true;
                continue;
            }
            if leading {
                leading = false;
                led_until = Some(now);
            }
            if !voters.contains(&me) || self.is_held_back() {
                continue;
            }
            let heard = self.peers().heard_from_leader().into_iter().chain(led_until).max().unwrap_or(started);
            // A drained node leaves leading to the others, unless none leads for long.
            if self.is_drained(me) && now < heard + DRAINED_STANDS_AFTER {
                wake = heard + DRAINED_STANDS_AFTER;
                continue;
            }
            if silent_since != Some(heard) {
                silent_since = Some(heard);
                stand_at = heard + self.stand_after(&voters, last_leader);
            }
            if now >= stand_at && now >= next_try {
                if self.pre_vote(&voters).await {
                    tracing::info!(
                        silent_ms = heard.elapsed().as_millis() as u64,
                        "no heartbeat from a leader and a quorum would vote: standing for election"
                    );
                    if let Err(e) = self.raft().trigger().elect().await {
                        tracing::error!(error = %e, "cannot stand for election");
                        return;
                    }
                    // One round takes about a lease: a node that lost it (a split
                    // vote) stands again after a random part of the timeout range.
                    let settings = self.settings();
                    next_try = Instant::now()
                        + settings.election_timeout_min
                        + jitter(settings.election_timeout_max - settings.election_timeout_min);
                } else {
                    next_try = Instant::now() + PRE_VOTE_RETRY + jitter(PRE_VOTE_RETRY);
                }
            }
            wake = stand_at.max(next_try);
        }
    }

    /// Asks every other voter whether it would vote for this node; true as
    /// soon as a quorum (this node included) says yes.
    async fn pre_vote(&self, voters: &[NodeId]) -> bool {
        let me = self.id();
        let req = PreVote { candidate: me, last_log: self.raft().data_metrics().borrow().last_log };
        let Ok(json) = serde_json::to_vec(&req) else { return false };
        let membership = self.metrics().membership_config.clone();
        let quorum = voters.len() / 2 + 1;
        let mut yes = 1;
        if yes >= quorum {
            return true;
        }
        let mut asks: FuturesUnordered<_> = voters
            .iter()
            .filter(|v| **v != me)
            .filter_map(|v| {
                let addr = membership.membership().get_node(v)?.addr.clone();
                let channel = self.peers().channel(*v, &addr).ok()?;
                let mut request = tonic::Request::new(Payload { json: json.clone() });
                request.set_timeout(PRE_VOTE_TIMEOUT);
                Some(async move {
                    let reply = RaftTransportClient::new(channel).pre_vote(request).await.ok()?;
                    serde_json::from_slice::<bool>(&reply.into_inner().json).ok()
                })
            })
            .collect();
        while let Some(answer) = asks.next().await {
            if answer == Some(true) {
                yes += 1;
                if yes >= quorum {
                    return true;
                }
            }
        }
        false
    }

    /// Whether this node would vote for `req.candidate` now: only if it
    /// neither took a leader's heartbeat nor voted within the lease (openraft
    /// checks the lease only against a leader's heartbeats; a node that just
    /// voted for a winner has not heard from it yet), and the candidate's log
    /// is at least as far along as its own. As leader: only once no quorum
    /// acknowledged it within the lease, and never while it hands over.
    pub(crate) async fn grants_pre_vote(&self, req: &PreVote) -> bool {
        let m = self.metrics();
        if !m.membership_config.membership().voter_ids().any(|v| v == req.candidate) {
            return false;
        }
        let lease = self.voter_lease();
        if m.state == ServerState::Leader {
            if *self.handover().borrow() != Handover::Idle {
                return false;
            }
            // A leader just elected has no acknowledgement yet: no.
            return self.quorum_acked_at().is_some_and(|acked| acked.elapsed() > lease);
        }
        let Ok(leased) = self.raft().with_raft_state(move |s| s.vote_last_modified().is_some_and(|at| at.elapsed() <= lease)).await else {
            return false;
        };
        let last_log = self.raft().data_metrics().borrow().last_log;
        !leased && req.last_log >= last_log
    }
}
