//! Telling the segment that a VIP moved: gratuitous ARP for IPv4, in both
//! the request and the reply form (hosts and switches differ in which they
//! honour), sent as raw Ethernet frames; an unsolicited neighbour
//! advertisement with the override flag for IPv6.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};

use socket2::{Domain, Protocol, Socket, Type};

use super::netlink::Link;

const ETH_P_ARP: u16 = 0x0806;
const BROADCAST: [u8; 6] = [0xff; 6];

/// Sends the announcements. Keeps its packet socket open: closing one makes
/// the kernel wait out an RCU grace period (tens of milliseconds on a busy
/// host), which would hold up the next VIP's takeover.
#[derive(Default)]
pub struct Announcer {
    packet: Option<Socket>,
}

impl Announcer {
    /// Announces `vip` on `link` once (each form once).
    pub fn announce(&mut self, link: &Link, vip: IpAddr) -> io::Result<()> {
        let mac = link.mac.ok_or_else(|| io::Error::other(format!("{} has no Ethernet address to announce with", link.name)))?;
        match vip {
            IpAddr::V4(ip) => {
                let socket = match &mut self.packet {
                    Some(socket) => socket,
                    none => none.insert(packet_socket()?),
                };
                for op in [ArpOp::Request, ArpOp::Reply] {
                    send_frame(socket, link.index, &garp(mac, ip, op))?;
                }
                Ok(())
            }
            IpAddr::V6(ip) => neighbour_advertisement(link.index, mac, ip),
        }
    }
}

#[derive(Clone, Copy)]
enum ArpOp {
    Request = 1,
    Reply = 2,
}

/// A gratuitous ARP frame: sender and target protocol address are both the
/// VIP, so every host that has it cached takes the new hardware address.
fn garp(mac: [u8; 6], ip: Ipv4Addr, op: ArpOp) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&(op as u16).to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    // The request asks nobody in particular; the reply is addressed to everyone.
    f.extend_from_slice(match op {
        ArpOp::Request => &[0; 6],
        ArpOp::Reply => &BROADCAST,
    });
    f.extend_from_slice(&ip.octets());
    f
}

/// A packet socket that only sends: protocol 0 receives nothing, so no
/// ARP traffic queues up on it while it stays open.
fn packet_socket() -> io::Result<Socket> {
    Socket::new(Domain::PACKET, Type::RAW, None)
}

fn send_frame(socket: &Socket, ifindex: u32, frame: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_ll is plain data; it is fully initialised here and
    // passed with its exact size to sendto, which only reads it.
    let sent = unsafe {
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ARP.to_be();
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&BROADCAST);
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An unsolicited neighbour advertisement to all nodes, with the override
/// flag, so neighbours replace the cached link-layer address. The kernel
/// fills in the ICMPv6 checksum of a raw ICMPv6 socket.
fn neighbour_advertisement(ifindex: u32, mac: [u8; 6], ip: Ipv6Addr) -> io::Result<()> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    socket.set_multicast_hops_v6(255)?;
    socket.set_multicast_if_v6(ifindex)?;
    socket.bind(&SocketAddrV6::new(ip, 0, 0, 0).into())?;
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&[136, 0, 0, 0]); // type, code, checksum
    p.extend_from_slice(&0x2000_0000u32.to_be_bytes()); // override
    p.extend_from_slice(&ip.octets());
    p.extend_from_slice(&[2, 1]); // target link-layer address, 8 bytes
    p.extend_from_slice(&mac);
    let all_nodes = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, ifindex);
    socket.send_to(&p, &all_nodes.into())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gratuitous_arp_names_the_vip_as_sender_and_target() {
        let mac = [2, 0, 0, 0, 0, 1];
        let ip = Ipv4Addr::new(192, 0, 2, 100);
        let req = garp(mac, ip, ArpOp::Request);
        assert_eq!(req.len(), 42);
        assert_eq!(&req[0..6], &BROADCAST, "to every host");
        assert_eq!(&req[12..14], &[0x08, 0x06]);
        assert_eq!(&req[20..22], &[0, 1], "request");
        assert_eq!((&req[22..28], &req[28..32]), (&mac[..], &ip.octets()[..]), "sender: our MAC, the VIP");
        assert_eq!((&req[32..38], &req[38..42]), (&[0u8; 6][..], &ip.octets()[..]), "target: the VIP");
        let reply = garp(mac, ip, ArpOp::Reply);
        assert_eq!(&reply[20..22], &[0, 2], "reply");
        assert_eq!(&reply[32..38], &BROADCAST);
    }
}
