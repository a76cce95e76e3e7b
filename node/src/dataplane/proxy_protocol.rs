//! The PROXY protocol header (HAProxy's, versions 1 and 2) that tells a
//! server the client's address when the balancer connects on its behalf.

use std::net::{IpAddr, SocketAddr};

use raftlb_proto::spec::ProxyProtocol;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a connection from `client` that arrived at `local`.
pub fn header(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    // Both addresses in one family: an IPv4 one is written as IPv4-mapped IPv6 if the other is IPv6.
    let (src, dst) = match (client.ip(), local.ip()) {
        (IpAddr::V4(s), IpAddr::V6(d)) => (IpAddr::V6(s.to_ipv6_mapped()), IpAddr::V6(d)),
        (IpAddr::V6(s), IpAddr::V4(d)) => (IpAddr::V6(s), IpAddr::V6(d.to_ipv6_mapped())),
        pair => pair,
    };
    match version {
        ProxyProtocol::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {family} {src} {dst} {} {}\r\n", client.port(), local.port()).into_bytes()
        }
        ProxyProtocol::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.push(0x21); // version 2, PROXY command
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11); // TCP over IPv4
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    out.push(0x21); // TCP over IPv6
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                _ => unreachable!("both addresses were brought to one family above"),
            }
            out.extend_from_slice(&client.port().to_be_bytes());
            out.extend_from_slice(&local.port().to_be_bytes());
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_names_both_ends() {
        let h = header(ProxyProtocol::V1, "192.0.2.7:51000".parse().unwrap(), "192.0.2.100:3306".parse().unwrap());
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 192.0.2.100 51000 3306\r\n");
    }

    #[test]
    fn v2_is_the_binary_form() {
        let h = header(ProxyProtocol::V2, "192.0.2.7:51000".parse().unwrap(), "192.0.2.100:3306".parse().unwrap());
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[192, 0, 2, 7]);
        assert_eq!(&h[20..24], &[192, 0, 2, 100]);
        assert_eq!(&h[24..], &[0xc7, 0x38, 0x0c, 0xea]);
    }

    #[test]
    fn mixed_families_become_ipv6() {
        let h = header(ProxyProtocol::V1, "192.0.2.7:1".parse().unwrap(), "[2001:db8::1]:2".parse().unwrap());
        assert_eq!(h, b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 1 2\r\n");
    }
}
