//! The VIP addresses on the node's interfaces, through rtnetlink: find the
//! interface for a VIP, add it with a short lifetime (refreshed by adding it
//! again), remove it, and find it where a crashed run left it.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, CacheInfo};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

/// An interface as the VIP manager needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub loopback: bool,
}

pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// A netlink connection in the node's network namespace.
    pub fn connect() -> std::io::Result<Netlink> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    async fn links(&self) -> Result<Vec<Link>, String> {
        let messages: Vec<LinkMessage> =
            self.handle.link().get().execute().try_collect().await.map_err(|e| format!("cannot list the interfaces: {e}"))?;
        Ok(messages
            .into_iter()
            .map(|m| {
                let loopback = m.header.flags.contains(LinkFlags::Loopback);
                let mut link = Link { index: m.header.index, name: String::new(), mac: None, loopback };
                for attr in m.attributes {
                    match attr {
                        LinkAttribute::IfName(name) => link.name = name,
                        LinkAttribute::Address(mac) if mac.len() == 6 => link.mac = mac.try_into().ok(),
                        _ => {}
                    }
                }
                link
            })
            .collect())
    }

    async fn addresses(&self) -> Result<Vec<AddressMessage>, String> {
        self.handle.address().get().execute().try_collect().await.map_err(|e| format!("cannot list the addresses: {e}"))
    }

    /// The interface a VIP goes on: the one named, or with `auto` the one
    /// holding an address whose network contains the VIP.
    pub async fn link_for(&self, vip: &IpNet, interface: &str) -> Result<Link, String> {
        let links = self.links().await?;
        if interface != "auto" {
            return links.into_iter().find(|l| l.name == interface).ok_or_else(|| {
                format!("VIP {vip}: there is no interface {interface:?} on this node (set `interface` in the spec, or `auto`)")
            });
        }
        for msg in self.addresses().await? {
            let prefix = msg.header.prefix_len;
            let Some(ip) = address_of(&msg) else { continue };
            let Ok(net) = IpNet::new(ip, prefix) else { continue };
            // Not the VIP itself (a stale copy of it says nothing about the network).
            if ip != vip.addr() && net.contains(&vip.addr()) {
                if let Some(link) = links.iter().find(|l| l.index == msg.header.index) {
                    return Ok(link.clone());
                }
            }
        }
        Err(format!("VIP {vip}: no interface of this node has an address in its network (with `interface: auto`); name the interface"))
    }

    /// Adds the VIP, or refreshes it when present, valid for `lifetime_s`
    /// seconds: the kernel removes it by itself unless it is added again.
    pub async fn add(&self, link: &Link, vip: &IpNet, lifetime_s: u32) -> Result<(), String> {
        let mut req = self.handle.address().add(link.index, vip.addr(), vip.prefix_len()).replace();
        let msg = req.message_mut();
        let mut lifetime = CacheInfo::default();
        lifetime.ifa_preferred = lifetime_s;
        lifetime.ifa_valid = lifetime_s;
        msg.attributes.push(AddressAttribute::CacheInfo(lifetime));
        let mut flags = AddressFlags::empty();
        if vip.addr().is_ipv6() {
            // Duplicate-address detection would hold the address back for a second or more.
            flags |= AddressFlags::Nodad;
        }
        if link.loopback {
            // On lo the kernel would make the VIP's whole network local (or
            // route it to lo): the node could reach no host in it, its peers
            // included. Only the address itself belongs there.
            flags |= AddressFlags::Noprefixroute;
        }
        if !flags.is_empty() {
            msg.attributes.push(AddressAttribute::Flags(flags));
        }
        req.execute().await.map_err(|e| format!("cannot add VIP {vip} on {}: {e}", link.name))
    }

    /// Removes the VIP from every interface that has it.
    pub async fn remove(&self, vip: &IpNet) -> Result<usize, String> {
        let mut removed = 0;
        for msg in self.addresses().await? {
            if address_of(&msg) == Some(vip.addr()) {
                self.handle.address().del(msg).execute().await.map_err(|e| format!("cannot remove VIP {vip}: {e}"))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS the peer's on point-to-point links.
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}
