//! Reading a capture file: pcap (micro- or nanosecond timestamps) or pcapng (any
//! number of sections and interfaces, each with its link type and timestamp
//! resolution), with pcap-file, into frames with their capture time in ns.

use std::{
    io::{self, Read},
    path::Path,
};

use pcap_file::{
    DataLink, PcapError, TsResolution,
    pcap::PcapReader,
    pcapng::{
        Block, PcapNgReader,
        blocks::interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
    },
};

use super::ReplayError;

/// More than any real snapshot length: a packet claiming more is corrupt.
const MAX_PACKET_BYTES: u32 = 16 << 20;

/// Why the next packet could not be read, before the file name and packet number are
/// known.
pub(super) enum ReadFailure {
    Truncated,
    Corrupt(String),
    Io(io::Error),
}

impl ReadFailure {
    fn from_pcap(e: PcapError) -> Self {
        match e {
            PcapError::IoError(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                ReadFailure::Truncated
            }
            PcapError::IncompleteBuffer => ReadFailure::Truncated,
            PcapError::IoError(e) => ReadFailure::Io(e),
            other => ReadFailure::Corrupt(other.to_string()),
        }
    }

    pub(super) fn into_error(self, path: &Path, packet: u64) -> ReplayError {
        let path = path.to_owned();
        match self {
            ReadFailure::Truncated => ReplayError::Truncated { path, packet },
            ReadFailure::Corrupt(reason) => ReplayError::Corrupt {
                path,
                packet,
                reason,
            },
            ReadFailure::Io(error) => ReplayError::Read {
                path,
                packet,
                error,
            },
        }
    }
}

/// One captured frame.
pub(super) struct Frame<'a> {
    pub ts_ns: u64,
    pub link: DataLink,
    pub data: &'a [u8],
}

/// How the timestamps of one pcapng interface read.
pub(super) struct Interface {
    link: DataLink,
    /// if_tsresol: units per second as a power of 10, or of 2 with the high bit set.
    ts_resolution: u8,
    /// if_tsoffset, seconds.
    ts_offset_s: u64,
}

impl Interface {
    fn of(idb: &InterfaceDescriptionBlock<'_>) -> Self {
        let mut i = Interface {
            link: idb.linktype,
            ts_resolution: 6,
            ts_offset_s: 0,
        };
        for option in &idb.options {
            match option {
                InterfaceDescriptionOption::IfTsResol(r) => i.ts_resolution = *r,
                InterfaceDescriptionOption::IfTsOffset(s) => i.ts_offset_s = *s,
                _ => {}
            }
        }
        i
    }

    fn ns(&self, units: u64) -> u64 {
        let units = u128::from(units);
        let ns = if self.ts_resolution & 0x80 != 0 {
            (units * 1_000_000_000) >> u32::from(self.ts_resolution & 0x7f).min(127)
        } else {
            let exp = u32::from(self.ts_resolution);
            if exp <= 9 {
                units * 10u128.pow(9 - exp)
            } else {
                units / 10u128.checked_pow(exp - 9).unwrap_or(u128::MAX)
            }
        };
        u64::try_from(ns)
            .unwrap_or(u64::MAX)
            .saturating_add(self.ts_offset_s.saturating_mul(1_000_000_000))
    }
}

/// The capture file bytes come from (the first four, read to tell pcap from pcapng,
/// put back in front).
type Source<R> = io::Chain<io::Cursor<[u8; 4]>, R>;

pub(super) enum Capture<R: Read> {
    Pcap {
        reader: PcapReader<Source<R>>,
        link: DataLink,
        snaplen: u32,
        ts: TsResolution,
        buf: Vec<u8>,
    },
    PcapNg {
        reader: PcapNgReader<Source<R>>,
        interfaces: Vec<Interface>,
        last_ts: u64,
        buf: Vec<u8>,
    },
}

impl<R: Read> Capture<R> {
    /// Reads the file header from `reader`; `path` names the file in errors.
    pub(super) fn open(path: &Path, mut reader: R) -> Result<Self, ReplayError> {
        let mut magic = [0u8; 4];
        let mut n = 0;
        while n < magic.len() {
            match reader.read(&mut magic[n..]) {
                Ok(0) => break,
                Ok(read) => n += read,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    return Err(ReplayError::Open {
                        path: path.to_owned(),
                        error,
                    });
                }
            }
        }
        let not_capture = |reason: String| ReplayError::NotACapture {
            path: path.to_owned(),
            reason,
        };
        if n < 4 {
            return Err(not_capture(format!("{n} bytes long")));
        }
        let source = io::Cursor::new(magic).chain(reader);
        if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
            let reader = PcapNgReader::new(source).map_err(|e| not_capture(e.to_string()))?;
            return Ok(Capture::PcapNg {
                reader,
                interfaces: Vec::new(),
                last_ts: 0,
                buf: Vec::new(),
            });
        }
        let reader = PcapReader::new(source).map_err(|e| not_capture(e.to_string()))?;
        let header = reader.header();
        Ok(Capture::Pcap {
            link: header.datalink,
            snaplen: header.snaplen,
            ts: header.ts_resolution,
            reader,
            buf: Vec::new(),
        })
    }

    pub(super) fn next_frame(&mut self) -> Result<Option<Frame<'_>>, ReadFailure> {
        match self {
            Capture::Pcap {
                reader,
                link,
                snaplen,
                ts,
                buf,
            } => {
                let Some(packet) = reader.next_raw_packet() else {
                    return Ok(None);
                };
                let packet = packet.map_err(ReadFailure::from_pcap)?;
                if packet.incl_len > MAX_PACKET_BYTES.max(*snaplen) {
                    return Err(ReadFailure::Corrupt(format!(
                        "it claims {} bytes, more than the capture's snapshot length {snaplen}",
                        packet.incl_len
                    )));
                }
                let frac = match ts {
                    TsResolution::MicroSecond => u64::from(packet.ts_frac) * 1000,
                    TsResolution::NanoSecond => u64::from(packet.ts_frac),
                };
                let ts_ns = u64::from(packet.ts_sec) * 1_000_000_000 + frac;
                buf.clear();
                buf.extend_from_slice(&packet.data);
                Ok(Some(Frame {
                    ts_ns,
                    link: *link,
                    data: buf,
                }))
            }
            Capture::PcapNg {
                reader,
                interfaces,
                last_ts,
                buf,
            } => loop {
                let Some(block) = reader.next_block() else {
                    return Ok(None);
                };
                let (interface, ts_units, data) = match block.map_err(ReadFailure::from_pcap)? {
                    Block::SectionHeader(_) => {
                        interfaces.clear();
                        continue;
                    }
                    Block::InterfaceDescription(idb) => {
                        interfaces.push(Interface::of(&idb));
                        continue;
                    }
                    Block::EnhancedPacket(epb) => (
                        epb.interface_id,
                        Some(epb.timestamp.as_nanos() as u64),
                        epb.data,
                    ),
                    Block::Packet(pb) => (u32::from(pb.interface_id), Some(pb.timestamp), pb.data),
                    Block::SimplePacket(spb) => (0, None, spb.data),
                    _ => continue,
                };
                let Some(iface) = interfaces.get(interface as usize) else {
                    return Err(ReadFailure::Corrupt(format!(
                        "it names interface {interface}, which was not described"
                    )));
                };
                if let Some(units) = ts_units {
                    *last_ts = iface.ns(units);
                }
                buf.clear();
                buf.extend_from_slice(&data);
                break Ok(Some(Frame {
                    ts_ns: *last_ts,
                    link: iface.link,
                    data: buf,
                }));
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcapng_timestamp_resolutions() {
        let i = |r| Interface {
            link: DataLink::ETHERNET,
            ts_resolution: r,
            ts_offset_s: 0,
        };
        assert_eq!(i(6).ns(1_500_000), 1_500_000_000);
        assert_eq!(i(9).ns(7), 7);
        assert_eq!(i(0x80 | 10).ns(1024), 1_000_000_000);
    }
}
