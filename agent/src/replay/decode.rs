//! From a captured frame to the TCP segment it carries: the link layer (Ethernet with
//! 802.1Q/802.1ad tags, Linux cooked SLL and SLL2, loopback/null, raw IP), IPv4 (not
//! fragments) and IPv6 (hop-by-hop, routing, destination-options and AH extension
//! headers; not fragments), and the TCP header. Frames cut by the snapshot length keep
//! the length the IP header gives, with the prefix that was captured.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use pcap_file::DataLink;

/// The link types whose frames [`ip_of`] reads.
pub const LINK_TYPES: &[DataLink] = &[
    DataLink::ETHERNET,
    DataLink::LINUX_SLL,
    DataLink::LINUX_SLL2,
    DataLink::NULL,
    DataLink::LOOP,
    DataLink::RAW,
    DataLink::IPV4,
    DataLink::IPV6,
];

/// The IP packet inside a link-layer frame.
pub fn ip_of(link: DataLink, frame: &[u8]) -> Option<&[u8]> {
    fn by_ethertype(ethertype: u16, rest: &[u8]) -> Option<&[u8]> {
        matches!(ethertype, 0x0800 | 0x86dd).then_some(rest)
    }
    match link {
        DataLink::ETHERNET => {
            let mut at = 12;
            loop {
                let ethertype = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
                // 802.1Q and 802.1ad tags
                if matches!(ethertype, 0x8100 | 0x88a8 | 0x9100) {
                    at += 4;
                    continue;
                }
                return by_ethertype(ethertype, frame.get(at + 2..)?);
            }
        }
        DataLink::LINUX_SLL => by_ethertype(
            u16::from_be_bytes(frame.get(14..16)?.try_into().ok()?),
            frame.get(16..)?,
        ),
        DataLink::LINUX_SLL2 => by_ethertype(
            u16::from_be_bytes(frame.get(0..2)?.try_into().ok()?),
            frame.get(20..)?,
        ),
        // The 4-byte address family is in the writer's byte order (NULL) or in network
        // order (LOOP), with values that differ between systems: the IP version says more.
        DataLink::NULL | DataLink::LOOP => frame.get(4..),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => Some(frame),
        _ => None,
    }
}

/// One TCP segment, as far as it was captured.
#[derive(Debug)]
pub struct Segment<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    /// The acknowledgment number, when the ACK flag is set.
    pub ack: Option<u32>,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    /// Payload bytes the segment carried on the wire.
    pub len: u64,
    /// The captured prefix of them.
    pub payload: &'a [u8],
}

/// The TCP segment in an IPv4 or IPv6 packet; None for anything else (other
/// protocols, fragments, headers cut short).
pub fn tcp_segment(ip: &[u8]) -> Option<Segment<'_>> {
    let (src, dst, l4, l4_len) = match ip.first()? >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip.len() < 20 || ihl < 20 || ip.len() < ihl || ip[9] != 6 {
                return None;
            }
            let fragment = u16::from_be_bytes([ip[6], ip[7]]);
            if fragment & 0x3fff != 0 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            // 0 in packets the sender's segmentation offload had not split yet.
            let total = if total == 0 { ip.len() } else { total };
            let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            (
                src,
                dst,
                &ip[ihl..ip.len().min(total.max(ihl))],
                total.checked_sub(ihl)?,
            )
        }
        6 => {
            if ip.len() < 40 {
                return None;
            }
            let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?));
            let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?));
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let mut left = if payload == 0 { ip.len() - 40 } else { payload };
            let mut next = ip[6];
            let mut at = 40;
            loop {
                let header_len = match next {
                    6 => break,
                    0 | 43 | 60 => (usize::from(*ip.get(at + 1)?) + 1) * 8,
                    51 => (usize::from(*ip.get(at + 1)?) + 2) * 4,
                    // Fragments and anything else: not a whole TCP segment.
                    _ => return None,
                };
                next = *ip.get(at)?;
                at += header_len;
                left = left.checked_sub(header_len)?;
            }
            let l4 = ip.get(at..)?;
            (src, dst, &l4[..l4.len().min(left)], left)
        }
        _ => return None,
    };
    if l4.len() < 20 {
        return None;
    }
    let data_offset = usize::from(l4[12] >> 4) * 4;
    if data_offset < 20 || l4.len() < data_offset || l4_len < data_offset {
        return None;
    }
    let flags = l4[13];
    let ack = flags & 0x10 != 0;
    Some(Segment {
        src: SocketAddr::new(src, u16::from_be_bytes([l4[0], l4[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([l4[2], l4[3]])),
        seq: u32::from_be_bytes(l4[4..8].try_into().ok()?),
        ack: ack.then(|| u32::from_be_bytes(l4[8..12].try_into().expect("4 bytes"))),
        fin: flags & 0x01 != 0,
        syn: flags & 0x02 != 0,
        rst: flags & 0x04 != 0,
        len: (l4_len - data_offset) as u64,
        payload: &l4[data_offset..],
    })
}
