//! Server selection, as HAProxy's `balance` does it. A [`Balancer`] picks one
//! server among the candidates the caller offers: servers that are up, take
//! new sessions (weight above 0) and have a free slot. Who is a candidate is
//! the backend's business; how to choose among them is this module's.

use std::net::IpAddr;
use std::sync::Mutex;

use raftlb_proto::spec::Balance;

/// What a balancer needs to know of one candidate server.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The server's index in its backend: stable across picks, used for state.
    pub index: usize,
    pub name: &'a str,
    pub weight: u32,
    /// Sessions the server serves now.
    pub active: u64,
}

pub struct Balancer {
    algorithm: Balance,
    /// Smooth weighted round robin: each server's current weight, by index.
    current: Mutex<Vec<i64>>,
}

impl Balancer {
    pub fn new(algorithm: Balance) -> Self {
        Balancer { algorithm, current: Mutex::new(Vec::new()) }
    }

    /// Picks one of `candidates` (all of which may take a session) for a
    /// client at `src`; `None` only when there is no candidate.
    pub fn pick(&self, candidates: &[Candidate], src: IpAddr) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        // Every algorithm takes the only candidate, and round robin's state
        // would come back where it was: no lock for a lone server.
        if candidates.len() == 1 {
            return Some(candidates[0].index);
        }
        let chosen = match self.algorithm {
            Balance::Roundrobin => self.smooth_weighted(candidates),
            Balance::Leastconn => least_loaded(candidates),
            Balance::Source => rendezvous(candidates, src),
            Balance::Random => two_random_choices(candidates),
        };
        Some(candidates[chosen].index)
    }

    /// nginx's smooth weighted round robin: every pick adds each candidate's
    /// weight to its current weight, takes the largest and subtracts the
    /// total from it. Weights 5,1,1 give a,a,b,a,c,a,a: spread, not bursts.
    fn smooth_weighted(&self, candidates: &[Candidate]) -> usize {
        let mut current = self.current.lock().expect("round robin state lock");
        let needed = candidates.iter().map(|c| c.index + 1).max().unwrap_or(0);
        if current.len() < needed {
            current.resize(needed, 0);
        }
        let total: i64 = candidates.iter().map(|c| i64::from(c.weight)).sum();
        let mut best = 0;
        for (i, c) in candidates.iter().enumerate() {
            current[c.index] += i64::from(c.weight);
            if current[c.index] > current[candidates[best].index] {
                best = i;
            }
        }
        current[candidates[best].index] -= total;
        best
    }
}

/// Fewest sessions per unit of weight; ties go to the first candidate.
fn least_loaded(candidates: &[Candidate]) -> usize {
    let load = |c: &Candidate| (c.active as u128 * 1_000_000) / u128::from(c.weight.max(1));
    (0..candidates.len()).min_by_key(|i| load(&candidates[*i])).unwrap_or(0)
}

/// Weighted rendezvous hashing of the client address: every node of the
/// cluster maps a client to the same server, and adding or removing a server
/// moves only the clients that go to, or went to, that server.
fn rendezvous(candidates: &[Candidate], src: IpAddr) -> usize {
    let client = match src {
        IpAddr::V4(a) => stable_hash(&a.octets()),
        IpAddr::V6(a) => stable_hash(&a.octets()),
    };
    let score = |c: &Candidate| {
        let h = mix(client ^ stable_hash(c.name.as_bytes()));
        // A uniform draw in (0, 1]; -w / ln(u) is the weighted rendezvous score.
        let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        -f64::from(c.weight.max(1)) / u.ln()
    };
    (0..candidates.len()).max_by(|a, b| score(&candidates[*a]).total_cmp(&score(&candidates[*b]))).unwrap_or(0)
}

/// The power of two random choices: draw two by weight, keep the less loaded.
fn two_random_choices(candidates: &[Candidate]) -> usize {
    let total: u64 = candidates.iter().map(|c| u64::from(c.weight.max(1))).sum();
    let draw = || {
        let mut n = fastrand::u64(0..total);
        for (i, c) in candidates.iter().enumerate() {
            let w = u64::from(c.weight.max(1));
            if n < w {
                return i;
            }
            n -= w;
        }
        candidates.len() - 1
    };
    let (a, b) = (draw(), draw());
    if candidates[b].active < candidates[a].active {
        b
    } else {
        a
    }
}

/// FNV-1a: the same on every node and every build, unlike std's hasher.
fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// splitmix64's finaliser: spreads FNV's output over all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
