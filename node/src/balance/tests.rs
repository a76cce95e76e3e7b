use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use super::*;

fn servers(weights: &[u32]) -> Vec<(String, u32)> {
    weights.iter().enumerate().map(|(i, w)| (format!("s{i}"), *w)).collect()
}

fn candidates<'a>(servers: &'a [(String, u32)], active: &[u64]) -> Vec<Candidate<'a>> {
    servers
        .iter()
        .enumerate()
        .map(|(i, (name, weight))| Candidate { index: i, name, weight: *weight, active: active.get(i).copied().unwrap_or(0) })
        .collect()
}

fn client(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

fn count(b: &Balancer, servers: &[(String, u32)], picks: u32) -> Vec<u32> {
    let mut hits = vec![0; servers.len()];
    for n in 0..picks {
        hits[b.pick(&candidates(servers, &[]), client(n)).unwrap()] += 1;
    }
    hits
}

#[test]
fn roundrobin_honours_weights_exactly_and_smoothly() {
    let s = servers(&[5, 1, 1]);
    let b = Balancer::new(Balance::Roundrobin);
    let order: Vec<usize> = (0..7).map(|_| b.pick(&candidates(&s, &[]), client(0)).unwrap()).collect();
    assert_eq!(order, [0, 0, 1, 0, 2, 0, 0], "nginx's smooth sequence for 5,1,1");
    assert_eq!(count(&b, &s, 7000), [5000, 1000, 1000]);
}

#[test]
fn roundrobin_skips_servers_that_are_not_candidates() {
    let s = servers(&[1, 1, 1]);
    let b = Balancer::new(Balance::Roundrobin);
    let mut hits = [0; 3];
    for _ in 0..300 {
        let only_two: Vec<_> = candidates(&s, &[]).into_iter().filter(|c| c.index != 1).collect();
        hits[b.pick(&only_two, client(0)).unwrap()] += 1;
    }
    assert_eq!(hits, [150, 0, 150]);
}

#[test]
fn leastconn_sends_to_the_least_loaded_per_weight() {
    let s = servers(&[1, 1, 2]);
    let b = Balancer::new(Balance::Leastconn);
    assert_eq!(b.pick(&candidates(&s, &[3, 1, 4]), client(0)), Some(1));
    assert_eq!(b.pick(&candidates(&s, &[3, 3, 4]), client(0)), Some(2), "4 sessions at weight 2 is a load of 2");
}

#[test]
fn source_hashing_is_stable_and_weighted() {
    let s = servers(&[1, 1, 2]);
    let b = Balancer::new(Balance::Source);
    for n in 0..100 {
        let first = b.pick(&candidates(&s, &[]), client(n));
        assert_eq!(b.pick(&candidates(&s, &[5, 0, 9]), client(n)), first, "load does not move a client");
    }
    let hits = count(&b, &s, 40_000);
    for (i, want) in [10_000.0, 10_000.0, 20_000.0].iter().enumerate() {
        let share = f64::from(hits[i]);
        assert!((share - want).abs() / want < 0.05, "server {i}: {hits:?}");
    }
}

#[test]
fn source_hashing_moves_only_the_share_of_a_removed_or_added_server() {
    let four = servers(&[1, 1, 1, 1]);
    let b = Balancer::new(Balance::Source);
    let before: Vec<usize> = (0..10_000).map(|n| b.pick(&candidates(&four, &[]), client(n)).unwrap()).collect();
    // s3 removed: only its clients move.
    let three: Vec<_> = candidates(&four, &[]).into_iter().filter(|c| c.index != 3).collect();
    let mut moved = 0;
    for (n, old) in before.iter().enumerate() {
        let new = b.pick(&three, client(n as u32)).unwrap();
        if *old != 3 {
            assert_eq!(new, *old, "client {n} did not use the removed server and must not move");
        } else {
            moved += 1;
        }
    }
    assert!((2_000..3_000).contains(&moved), "about a quarter moved: {moved}");
    // s4 added: clients move only onto it.
    let five = servers(&[1, 1, 1, 1, 1]);
    let onto_new = (0..10_000)
        .filter(|n| {
            let new = b.pick(&candidates(&five, &[]), client(*n)).unwrap();
            assert!(new == before[*n as usize] || new == 4, "client {n} moved between old servers");
            new == 4
        })
        .count();
    assert!((1_600..2_400).contains(&onto_new), "about a fifth moved onto the new server: {onto_new}");
}

#[test]
fn random_spreads_by_weight_and_prefers_the_less_loaded_of_two() {
    let s = servers(&[1, 3]);
    let b = Balancer::new(Balance::Random);
    let hits = count(&b, &s, 40_000);
    // Two weighted draws; on equal load the first is kept, so the split
    // follows the weights, 1:3.
    assert!((9_000..11_000).contains(&hits[0]), "{hits:?}");
    let mut by_load = HashMap::new();
    for _ in 0..10_000 {
        *by_load.entry(b.pick(&candidates(&s, &[0, 50]), client(0)).unwrap()).or_insert(0) += 1;
    }
    // The idle s0 wins whenever either draw is s0: 1 - (3/4)^2 = 7/16 of the
    // picks, against 1/4 by weight alone.
    let idle = by_load.get(&0).copied().unwrap_or(0);
    assert!((4_000..4_800).contains(&idle), "{by_load:?}");
}

#[test]
fn no_candidate_no_pick() {
    for algorithm in [Balance::Roundrobin, Balance::Leastconn, Balance::Source, Balance::Random] {
        assert_eq!(Balancer::new(algorithm).pick(&[], client(0)), None);
    }
}
