//! A small reader of the kernel's BTF, written from the format description in the
//! kernel's Documentation/bpf/btf.rst.
//!
//! Rust eBPF programs get no CO-RE relocations, so the agent reads the offsets of the
//! few kernel struct members the probes need from the running kernel's BTF
//! (/sys/kernel/btf/vmlinux) at start-up and hands them to the programs
//! ([`kernel_offsets`]).
//!
//! Raw BTF is a header, a type section and a string section. Only what is needed to
//! find members of structs is kept: the start of every type record (its id is its
//! position) and an index from struct/union names to their ids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use agent_common::KernelOffsets;

/// Where the running kernel publishes its own BTF.
pub const KERNEL_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;
const MIN_HEADER_LEN: usize = 24;
/// Limit on nested anonymous members, typedef chains and the like, against loops in
/// malformed data.
const MAX_DEPTH: u32 = 32;

/// BTF kinds (`BTF_KIND_*`).
mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const FWD: u32 = 7;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const FLOAT: u32 = 16;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

/// What can go wrong reading BTF or finding a member in it. Every message says what is
/// missing and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "the kernel has no BTF at {path}: sonde needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.4 have it); \
         run sonde on such a kernel"
    )]
    NoKernelBtf { path: PathBuf },

    #[error(
        "cannot read BTF from {path}: {error}; check that the file exists and that sonde may read it"
    )]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("malformed BTF data: {0}; the BTF file is truncated or corrupt")]
    Malformed(String),

    #[error(
        "BTF type {id} has kind {kind}, which this version of sonde does not know: the \
         kernel's BTF is newer than sonde; upgrade sonde"
    )]
    UnknownKind { id: u32, kind: u32 },

    #[error(
        "struct {name} is not in the kernel's BTF: sonde needs its layout and cannot \
         trace on this kernel; please report the kernel version"
    )]
    StructNotFound { name: String },

    #[error(
        "the kernel's BTF only declares struct {name} without its layout: sonde needs \
         the layout and cannot trace on this kernel; please report the kernel version"
    )]
    OnlyDeclared { name: String },

    #[error("member path \"{path}\" for struct {struct_name} has an empty element")]
    EmptyPath { struct_name: String, path: String },

    #[error(
        "{struct_name}.{path}: the kernel's BTF has no member {member} there, so sonde \
         cannot trace on this kernel; please report the kernel version"
    )]
    MemberNotFound {
        struct_name: String,
        path: String,
        member: String,
    },

    #[error(
        "{struct_name}.{path}: member {member} is not a struct or union, so the path \
         cannot go on past it; the member path is wrong for this kernel"
    )]
    NotComposite {
        struct_name: String,
        path: String,
        member: String,
    },

    #[error(
        "{struct_name}.{path} is a bit-field starting at bit {bit_offset}, not on a \
         byte boundary: the probes cannot read it, so sonde cannot trace on this kernel"
    )]
    NotByteAligned {
        struct_name: String,
        path: String,
        bit_offset: u32,
    },

    #[error(
        "{struct_name}.{path} is a bit-field of {bits} bits: the probes read whole \
         bytes, so sonde cannot trace on this kernel"
    )]
    BitField {
        struct_name: String,
        path: String,
        bits: u32,
    },

    #[error(
        "{field} has no fixed size in the kernel's BTF (type {type_id}, kind {kind}); \
         the member path is wrong for this kernel"
    )]
    NoSize {
        field: String,
        type_id: u32,
        kind: u32,
    },

    #[error(
        "{field} is {actual} bytes in this kernel but sonde's probes read {expected} \
         bytes: sonde cannot trace on this kernel; please report the kernel version"
    )]
    SizeMismatch {
        field: String,
        expected: u32,
        actual: u32,
    },
}

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

/// Parsed BTF: the raw bytes plus where each type record starts.
pub struct Btf {
    data: Vec<u8>,
    big_endian: bool,
    /// Absolute offset and length of the string section.
    str_start: usize,
    str_len: usize,
    /// Absolute offset of each type record; index 0 (void) is unused.
    type_offsets: Vec<u32>,
    /// Names of structs, unions and forward declarations -> their type ids.
    composites: HashMap<Box<str>, Vec<u32>>,
    /// Size of a pointer: that of `long unsigned int` if the BTF has it, else 8.
    ptr_size: u32,
}

/// A type record's common part (`struct btf_type`).
#[derive(Clone, Copy, Debug)]
struct TypeHead {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    /// Absolute offset of the data that follows the common part.
    extra: usize,
}

/// Where a member sits, in bits from the start of the outermost struct.
#[derive(Clone, Copy, Debug)]
struct Location {
    bit_offset: u32,
    /// 0 unless the member is a bit-field.
    bitfield_bits: u32,
    type_id: u32,
}

impl Btf {
    /// Parses raw BTF (as in /sys/kernel/btf/vmlinux or an ELF `.BTF` section).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BtfError> {
        Self::parse(bytes.to_vec())
    }

    /// Reads and parses a raw BTF file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BtfError> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|error| BtfError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(data)
    }

    /// Reads the running kernel's BTF from [`KERNEL_BTF_PATH`].
    pub fn from_kernel() -> Result<Self, BtfError> {
        match Self::from_file(KERNEL_BTF_PATH) {
            Err(BtfError::Read { path, error }) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(BtfError::NoKernelBtf { path })
            }
            other => other,
        }
    }

    fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        if data.len() < MIN_HEADER_LEN {
            return Err(malformed(format!(
                "{} bytes is too short for a BTF header",
                data.len()
            )));
        }
        let magic_le = u16::from_le_bytes([data[0], data[1]]);
        let big_endian = match magic_le {
            BTF_MAGIC => false,
            m if m == BTF_MAGIC.swap_bytes() => true,
            m => return Err(malformed(format!("bad magic {m:#06x}, not BTF"))),
        };
        let version = data[2];
        if version != 1 {
            return Err(malformed(format!(
                "BTF version {version}, sonde reads version 1"
            )));
        }
        let mut btf = Btf {
            data,
            big_endian,
            str_start: 0,
            str_len: 0,
            type_offsets: vec![0],
            composites: HashMap::new(),
            ptr_size: 8,
        };
        let hdr_len = btf.u32_at(4)? as usize;
        if hdr_len < MIN_HEADER_LEN || hdr_len > btf.data.len() {
            return Err(malformed(format!("header length {hdr_len} out of range")));
        }
        let section = |off: u32, len: u32, what: &str| -> Result<(usize, usize), BtfError> {
            let start = hdr_len
                .checked_add(off as usize)
                .ok_or_else(|| malformed(format!("{what} section offset overflows")))?;
            let end = start
                .checked_add(len as usize)
                .filter(|&end| end <= btf.data.len())
                .ok_or_else(|| {
                    malformed(format!(
                        "{what} section ({len} bytes at {start}) goes past the end of the data ({} bytes)",
                        btf.data.len()
                    ))
                })?;
            Ok((start, end))
        };
        let (type_start, type_end) = section(btf.u32_at(8)?, btf.u32_at(12)?, "type")?;
        let (str_start, str_end) = section(btf.u32_at(16)?, btf.u32_at(20)?, "string")?;
        btf.str_start = str_start;
        btf.str_len = str_end - str_start;
        if btf.str_len > 0 && btf.data[str_end - 1] != 0 {
            return Err(malformed("string section does not end with NUL"));
        }
        btf.index_types(type_start, type_end)?;
        Ok(btf)
    }

    /// Walks the type section once: records where each type starts, indexes the names
    /// of structs, unions and forward declarations, and notes the pointer size.
    fn index_types(&mut self, start: usize, end: usize) -> Result<(), BtfError> {
        let mut pos = start;
        while pos < end {
            let id =
                u32::try_from(self.type_offsets.len()).map_err(|_| malformed("too many types"))?;
            if end - pos < 12 {
                return Err(malformed(format!(
                    "type {id} is cut off at the end of the type section"
                )));
            }
            let offset = u32::try_from(pos).map_err(|_| malformed("type section too large"))?;
            self.type_offsets.push(offset);
            let head = self.head_at(pos)?;
            let extra_len = match head.kind {
                kind::INT => 4,
                kind::PTR
                | kind::FWD
                | kind::TYPEDEF
                | kind::VOLATILE
                | kind::CONST
                | kind::RESTRICT
                | kind::FUNC
                | kind::FLOAT
                | kind::TYPE_TAG => 0,
                kind::ARRAY => 12,
                kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => {
                    12 * head.vlen as usize
                }
                kind::ENUM | kind::FUNC_PROTO => 8 * head.vlen as usize,
                kind::VAR | kind::DECL_TAG => 4,
                k => return Err(BtfError::UnknownKind { id, kind: k }),
            };
            pos = head
                .extra
                .checked_add(extra_len)
                .filter(|&p| p <= end)
                .ok_or_else(|| {
                    malformed(format!("type {id} goes past the end of the type section"))
                })?;
            match head.kind {
                kind::STRUCT | kind::UNION | kind::FWD if head.name_off != 0 => {
                    let name = self.str_at(head.name_off)?;
                    if !name.is_empty() {
                        let name: Box<str> = name.into();
                        self.composites.entry(name).or_default().push(id);
                    }
                }
                kind::INT if self.str_at(head.name_off)? == "long unsigned int" => {
                    self.ptr_size = head.size_or_type;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn u32_at(&self, pos: usize) -> Result<u32, BtfError> {
        let bytes: [u8; 4] = pos
            .checked_add(4)
            .and_then(|end| self.data.get(pos..end))
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| malformed(format!("read of 4 bytes at {pos} past the end")))?;
        Ok(if self.big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    }

    fn head_at(&self, pos: usize) -> Result<TypeHead, BtfError> {
        let info = self.u32_at(pos + 4)?;
        Ok(TypeHead {
            name_off: self.u32_at(pos)?,
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(pos + 8)?,
            extra: pos + 12,
        })
    }

    fn str_at(&self, off: u32) -> Result<&str, BtfError> {
        let off = off as usize;
        if off >= self.str_len {
            return Err(malformed(format!(
                "string offset {off} past the string section ({} bytes)",
                self.str_len
            )));
        }
        let strings = &self.data[self.str_start..self.str_start + self.str_len];
        let rest = &strings[off..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| malformed(format!("string at {off} has no NUL")))?;
        std::str::from_utf8(&rest[..len])
            .map_err(|_| malformed(format!("string at {off} is not UTF-8")))
    }

    fn head(&self, id: u32) -> Result<TypeHead, BtfError> {
        if id == 0 {
            return Err(malformed("type id 0 (void) used where a type is needed"));
        }
        let pos = *self.type_offsets.get(id as usize).ok_or_else(|| {
            malformed(format!(
                "type id {id} out of range ({} types)",
                self.type_count()
            ))
        })?;
        self.head_at(pos as usize)
    }

    /// Number of types, not counting void.
    pub fn type_count(&self) -> usize {
        self.type_offsets.len() - 1
    }

    /// Follows typedefs and const/volatile/restrict/type-tag modifiers to the type
    /// underneath.
    fn resolve(&self, mut id: u32) -> Result<(u32, TypeHead), BtfError> {
        for _ in 0..MAX_DEPTH {
            let head = self.head(id)?;
            match head.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = head.size_or_type;
                }
                _ => return Ok((id, head)),
            }
        }
        Err(malformed(format!(
            "type chain from type {id} too long (a loop?)"
        )))
    }

    /// The id of the struct named `name`: the first STRUCT (not a forward declaration)
    /// with that name.
    fn find_struct(&self, name: &str) -> Result<u32, BtfError> {
        let ids = self
            .composites
            .get(name)
            .ok_or_else(|| BtfError::StructNotFound {
                name: name.to_string(),
            })?;
        for &id in ids {
            if self.head(id)?.kind == kind::STRUCT {
                return Ok(id);
            }
        }
        if ids
            .iter()
            .any(|&id| matches!(self.head(id), Ok(h) if h.kind == kind::FWD))
        {
            Err(BtfError::OnlyDeclared {
                name: name.to_string(),
            })
        } else {
            Err(BtfError::StructNotFound {
                name: name.to_string(),
            })
        }
    }

    /// Member `i` of the struct or union `head`: (name offset, type, bit offset,
    /// bit-field size).
    fn member(&self, head: &TypeHead, i: u32) -> Result<(u32, u32, u32, u32), BtfError> {
        let pos = head.extra + 12 * i as usize;
        let name_off = self.u32_at(pos)?;
        let type_id = self.u32_at(pos + 4)?;
        let offset = self.u32_at(pos + 8)?;
        if head.kind_flag {
            return Ok((name_off, type_id, offset & 0x00ff_ffff, offset >> 24));
        }
        // Without kind_flag, a bit-field is an INT member whose encoding has its own
        // bit offset and bit count.
        let (_, ty) = self.resolve(type_id)?;
        if ty.kind == kind::INT {
            let enc = self.u32_at(ty.extra)?;
            let int_offset = (enc >> 16) & 0xff;
            let int_bits = enc & 0xff;
            if int_offset != 0 || int_bits != ty.size_or_type.saturating_mul(8) {
                return Ok((
                    name_off,
                    type_id,
                    offset.saturating_add(int_offset),
                    int_bits,
                ));
            }
        }
        Ok((name_off, type_id, offset, 0))
    }

    /// Looks `name` up among the members of the struct/union `id`, descending into
    /// anonymous struct/union members.
    fn find_member(&self, id: u32, name: &str, depth: u32) -> Result<Option<Location>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!(
                "anonymous members nested too deep in type {id}"
            )));
        }
        let head = self.head(id)?;
        for i in 0..head.vlen {
            let (name_off, type_id, bit_offset, bitfield_bits) = self.member(&head, i)?;
            let member_name = self.str_at(name_off)?;
            if member_name == name {
                return Ok(Some(Location {
                    bit_offset,
                    bitfield_bits,
                    type_id,
                }));
            }
            if member_name.is_empty() {
                let (inner, inner_head) = self.resolve(type_id)?;
                if matches!(inner_head.kind, kind::STRUCT | kind::UNION)
                    && let Some(mut loc) = self.find_member(inner, name, depth + 1)?
                {
                    loc.bit_offset = loc.bit_offset.saturating_add(bit_offset);
                    return Ok(Some(loc));
                }
            }
        }
        Ok(None)
    }

    fn locate(&self, struct_name: &str, path: &str) -> Result<Location, BtfError> {
        if path.split('.').any(str::is_empty) {
            return Err(BtfError::EmptyPath {
                struct_name: struct_name.to_string(),
                path: path.to_string(),
            });
        }
        let mut current = self.find_struct(struct_name)?;
        let mut loc: Option<(Location, &str)> = None;
        for member in path.split('.') {
            if let Some((prev, prev_name)) = loc {
                let (id, head) = self.resolve(prev.type_id)?;
                if !matches!(head.kind, kind::STRUCT | kind::UNION) || prev.bitfield_bits != 0 {
                    return Err(BtfError::NotComposite {
                        struct_name: struct_name.to_string(),
                        path: path.to_string(),
                        member: prev_name.to_string(),
                    });
                }
                current = id;
            }
            let found =
                self.find_member(current, member, 0)?
                    .ok_or_else(|| BtfError::MemberNotFound {
                        struct_name: struct_name.to_string(),
                        path: path.to_string(),
                        member: member.to_string(),
                    })?;
            let bit_offset = match loc {
                Some((prev, _)) => prev.bit_offset.saturating_add(found.bit_offset),
                None => found.bit_offset,
            };
            loc = Some((
                Location {
                    bit_offset,
                    ..found
                },
                member,
            ));
        }
        // `path` has at least one element, so the loop ran at least once.
        loc.map(|(l, _)| l).ok_or_else(|| BtfError::EmptyPath {
            struct_name: struct_name.to_string(),
            path: path.to_string(),
        })
    }

    /// Byte offset of the member at the dotted `path` (e.g. `"__sk_common.skc_dport"`)
    /// in `struct struct_name`. Each path element may sit inside anonymous structs or
    /// unions; typedefs and const/volatile are followed. A member that does not start on
    /// a byte boundary is an error.
    pub fn member_offset(&self, struct_name: &str, path: &str) -> Result<u32, BtfError> {
        let loc = self.locate(struct_name, path)?;
        if loc.bit_offset % 8 != 0 {
            return Err(BtfError::NotByteAligned {
                struct_name: struct_name.to_string(),
                path: path.to_string(),
                bit_offset: loc.bit_offset,
            });
        }
        Ok(loc.bit_offset / 8)
    }

    /// Size in bytes of the member at the dotted `path` in `struct struct_name`. A
    /// bit-field counts only if it is whole bytes on a byte boundary.
    pub fn member_size(&self, struct_name: &str, path: &str) -> Result<u32, BtfError> {
        let loc = self.locate(struct_name, path)?;
        if loc.bitfield_bits != 0 {
            if loc.bitfield_bits % 8 != 0 {
                return Err(BtfError::BitField {
                    struct_name: struct_name.to_string(),
                    path: path.to_string(),
                    bits: loc.bitfield_bits,
                });
            }
            if loc.bit_offset % 8 != 0 {
                return Err(BtfError::NotByteAligned {
                    struct_name: struct_name.to_string(),
                    path: path.to_string(),
                    bit_offset: loc.bit_offset,
                });
            }
            return Ok(loc.bitfield_bits / 8);
        }
        self.type_size(loc.type_id, &format!("{struct_name}.{path}"), 0)
    }

    fn type_size(&self, id: u32, field: &str, depth: u32) -> Result<u32, BtfError> {
        let (id, head) = self.resolve(id)?;
        match head.kind {
            kind::INT | kind::ENUM | kind::ENUM64 | kind::STRUCT | kind::UNION | kind::FLOAT => {
                Ok(head.size_or_type)
            }
            kind::PTR => Ok(self.ptr_size),
            kind::ARRAY if depth < MAX_DEPTH => {
                let elem = self.u32_at(head.extra)?;
                let n = self.u32_at(head.extra + 8)?;
                let elem_size = self.type_size(elem, field, depth + 1)?;
                elem_size
                    .checked_mul(n)
                    .ok_or_else(|| malformed(format!("array type {id} size overflows")))
            }
            k => Err(BtfError::NoSize {
                field: field.to_string(),
                type_id: id,
                kind: k,
            }),
        }
    }
}

/// Offset of `struct_name.path`, checking that the member is `size` bytes as the
/// probes assume (`0` = pointer).
fn field(btf: &Btf, struct_name: &str, path: &str, size: u32) -> Result<u32, BtfError> {
    let offset = btf.member_offset(struct_name, path)?;
    let actual = btf.member_size(struct_name, path)?;
    let expected = if size == 0 { 8 } else { size };
    if actual != expected {
        return Err(BtfError::SizeMismatch {
            field: format!("{struct_name}.{path}"),
            expected,
            actual,
        });
    }
    Ok(offset)
}

/// Every offset the probes need, read from `btf` (normally [`Btf::from_kernel`]), with
/// the sizes the probes read checked.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    const PTR: u32 = 0;
    Ok(KernelOffsets {
        task_files: field(btf, "task_struct", "files", PTR)?,
        task_exit_code: field(btf, "task_struct", "exit_code", 4)?,
        files_fdt: field(btf, "files_struct", "fdt", PTR)?,
        fdtable_max_fds: field(btf, "fdtable", "max_fds", 4)?,
        fdtable_fd: field(btf, "fdtable", "fd", PTR)?,
        file_private_data: field(btf, "file", "private_data", PTR)?,
        file_f_inode: field(btf, "file", "f_inode", PTR)?,
        inode_i_mode: field(btf, "inode", "i_mode", 2)?,
        socket_type: field(btf, "socket", "type", 2)?,
        socket_file: field(btf, "socket", "file", PTR)?,
        socket_sk: field(btf, "socket", "sk", PTR)?,
        sk_family: field(btf, "sock", "__sk_common.skc_family", 2)?,
        sk_daddr: field(btf, "sock", "__sk_common.skc_daddr", 4)?,
        sk_rcv_saddr: field(btf, "sock", "__sk_common.skc_rcv_saddr", 4)?,
        sk_dport: field(btf, "sock", "__sk_common.skc_dport", 2)?,
        sk_num: field(btf, "sock", "__sk_common.skc_num", 2)?,
        sk_v6_daddr: field(btf, "sock", "__sk_common.skc_v6_daddr", 16)?,
        sk_v6_rcv_saddr: field(btf, "sock", "__sk_common.skc_v6_rcv_saddr", 16)?,
        sk_protocol: field(btf, "sock", "sk_protocol", 2)?,
        task_mm: field(btf, "task_struct", "mm", PTR)?,
        mm_arg_start: field(btf, "mm_struct", "arg_start", 8)?,
        mm_arg_end: field(btf, "mm_struct", "arg_end", 8)?,
        mm_env_start: field(btf, "mm_struct", "env_start", 8)?,
        mm_env_end: field(btf, "mm_struct", "env_end", 8)?,
        task_real_parent: field(btf, "task_struct", "real_parent", PTR)?,
        task_pid: field(btf, "task_struct", "pid", 4)?,
        task_tgid: field(btf, "task_struct", "tgid", 4)?,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds raw BTF by hand, following btf.rst.
    struct Builder {
        big_endian: bool,
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new(big_endian: bool) -> Self {
            Builder {
                big_endian,
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn put(&mut self, v: u32) {
            let bytes = if self.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            self.types.extend_from_slice(&bytes);
        }

        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn head(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            kind_flag: bool,
            size_or_type: u32,
        ) -> u32 {
            let name_off = self.s(name);
            self.put(name_off);
            self.put((kind_flag as u32) << 31 | kind << 24 | vlen);
            self.put(size_or_type);
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.head(name, kind::INT, 0, false, size);
            self.put(size * 8);
            id
        }

        /// An INT with its own bit offset and bit count (old-style bit-field).
        fn int_bits(&mut self, name: &str, size: u32, bit_offset: u32, bits: u32) -> u32 {
            let id = self.head(name, kind::INT, 0, false, size);
            self.put(bit_offset << 16 | bits);
            id
        }

        fn wrap(&mut self, kind: u32, name: &str, target: u32) -> u32 {
            self.head(name, kind, 0, false, target)
        }

        fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            let id = self.head("", kind::ARRAY, 0, false, 0);
            self.put(elem);
            self.put(index);
            self.put(n);
            id
        }

        /// Members are (name, type, offset field as encoded).
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            kind_flag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let id = self.head(name, kind, members.len() as u32, kind_flag, size);
            for &(name, ty, offset) in members {
                let n = self.s(name);
                self.put(n);
                self.put(ty);
                self.put(offset);
            }
            id
        }

        fn build(mut self) -> Vec<u8> {
            let types = std::mem::take(&mut self.types);
            let strings = std::mem::take(&mut self.strings);
            let magic = if self.big_endian {
                BTF_MAGIC.to_be_bytes()
            } else {
                BTF_MAGIC.to_le_bytes()
            };
            // Header words go through `put`, then come the sections.
            for v in [
                24,
                0,
                types.len() as u32,
                types.len() as u32,
                strings.len() as u32,
            ] {
                self.put(v);
            }
            let mut out = Vec::new();
            out.extend_from_slice(&magic);
            out.push(1); // version
            out.push(0); // flags
            out.extend_from_slice(&self.types); // hdr_len, type_off, type_len, str_off, str_len
            out.extend_from_slice(&types);
            out.extend_from_slice(&strings);
            out
        }
    }

    /// kind_flag member offset: bit-field size in the top 8 bits.
    fn kf(bit_offset: u32, bits: u32) -> u32 {
        bits << 24 | bit_offset
    }

    /// A small type graph exercising what the kernel's BTF needs:
    ///
    /// ```c
    /// struct common;                       // forward declaration first
    /// typedef unsigned short __be16;
    /// struct common {                      // 32 bytes
    ///     union {                          // anonymous, at 0
    ///         unsigned long long addrpair;
    ///         struct { unsigned int daddr; unsigned int saddr; };  // anonymous
    ///     };
    ///     const volatile __be16 dport;     // at 8
    ///     unsigned char v6[16];            // at 16
    /// };
    /// typedef const struct common common_t;
    /// struct outer {                       // 64 bytes
    ///     unsigned int x;                  // at 0
    ///     common_t c;                      // at 8
    ///     struct common *p;                // at 40
    ///     unsigned short proto;            // at 48
    /// };
    /// struct bits {                        // kind_flag = 1
    ///     unsigned int lo:4, mid:4;        // bits 0..8
    ///     unsigned int proto:16;           // bits 8..24
    ///     unsigned char full;              // at 3, not a bit-field
    /// };
    /// struct oldbits {                     // kind_flag = 0, INT encoding
    ///     unsigned int a:3;                // at bit 32+3
    /// };
    /// ```
    fn sample(big_endian: bool) -> Vec<u8> {
        let mut b = Builder::new(big_endian);
        let u8_ = b.int("unsigned char", 1);
        let u16_ = b.int("short unsigned int", 2);
        let u32_ = b.int("unsigned int", 4);
        let u64_ = b.int("long long unsigned int", 8);
        let _ulong = b.int("long unsigned int", 8);
        let _fwd = b.wrap(kind::FWD, "common", 0);
        let be16 = b.wrap(kind::TYPEDEF, "__be16", u16_);
        let vol = b.wrap(kind::VOLATILE, "", be16);
        let cvbe16 = b.wrap(kind::CONST, "", vol);
        let anon_s = b.composite(
            kind::STRUCT,
            "",
            8,
            false,
            &[("daddr", u32_, 0), ("saddr", u32_, 32)],
        );
        let anon_u = b.composite(
            kind::UNION,
            "",
            8,
            false,
            &[("addrpair", u64_, 0), ("", anon_s, 0)],
        );
        let arr = b.array(u8_, u32_, 16);
        let common = b.composite(
            kind::STRUCT,
            "common",
            32,
            false,
            &[("", anon_u, 0), ("dport", cvbe16, 64), ("v6", arr, 128)],
        );
        let ccommon = b.wrap(kind::CONST, "", common);
        let common_t = b.wrap(kind::TYPEDEF, "common_t", ccommon);
        let pcommon = b.wrap(kind::PTR, "", common);
        b.composite(
            kind::STRUCT,
            "outer",
            64,
            false,
            &[
                ("x", u32_, 0),
                ("c", common_t, 64),
                ("p", pcommon, 320),
                ("proto", u16_, 384),
            ],
        );
        b.composite(
            kind::STRUCT,
            "bits",
            4,
            true,
            &[
                ("lo", u32_, kf(0, 4)),
                ("mid", u32_, kf(4, 4)),
                ("proto", u32_, kf(8, 16)),
                ("full", u8_, kf(24, 0)),
            ],
        );
        let int3 = b.int_bits("unsigned int", 4, 3, 3);
        b.composite(kind::STRUCT, "oldbits", 8, false, &[("a", int3, 32)]);
        // A union and a second struct sharing a name: the first STRUCT wins.
        b.composite(kind::UNION, "dup", 4, false, &[("u", u32_, 0)]);
        b.composite(kind::STRUCT, "dup", 4, false, &[("first", u32_, 0)]);
        b.composite(kind::STRUCT, "dup", 4, false, &[("second", u32_, 0)]);
        b.wrap(kind::FWD, "only_declared", 0);
        b.build()
    }

    fn check_sample(btf: &Btf) {
        assert_eq!(btf.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "c").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "c.daddr").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "c.saddr").unwrap(), 12);
        assert_eq!(btf.member_offset("outer", "c.addrpair").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "c.dport").unwrap(), 16);
        assert_eq!(btf.member_offset("outer", "c.v6").unwrap(), 24);
        assert_eq!(btf.member_offset("outer", "p").unwrap(), 40);
        assert_eq!(btf.member_offset("outer", "proto").unwrap(), 48);
        assert_eq!(btf.member_offset("common", "saddr").unwrap(), 4);

        assert_eq!(btf.member_size("outer", "c").unwrap(), 32);
        assert_eq!(btf.member_size("outer", "c.saddr").unwrap(), 4);
        assert_eq!(btf.member_size("outer", "c.addrpair").unwrap(), 8);
        assert_eq!(btf.member_size("outer", "c.dport").unwrap(), 2);
        assert_eq!(btf.member_size("outer", "c.v6").unwrap(), 16);
        assert_eq!(btf.member_size("outer", "p").unwrap(), 8);
        assert_eq!(btf.member_size("outer", "proto").unwrap(), 2);
    }

    #[test]
    fn reads_hand_built_btf() {
        let btf = Btf::from_bytes(&sample(false)).unwrap();
        assert_eq!(btf.type_count(), 24);
        check_sample(&btf);
    }

    #[test]
    fn reads_big_endian_btf() {
        let btf = Btf::from_bytes(&sample(true)).unwrap();
        check_sample(&btf);
    }

    #[test]
    fn kind_flag_bitfields() {
        let btf = Btf::from_bytes(&sample(false)).unwrap();
        assert_eq!(btf.member_offset("bits", "lo").unwrap(), 0);
        assert!(matches!(
            btf.member_offset("bits", "mid"),
            Err(BtfError::NotByteAligned { bit_offset: 4, .. })
        ));
        // A bit-field of whole bytes on a byte boundary can be read.
        assert_eq!(btf.member_offset("bits", "proto").unwrap(), 1);
        assert_eq!(btf.member_size("bits", "proto").unwrap(), 2);
        assert!(matches!(
            btf.member_size("bits", "lo"),
            Err(BtfError::BitField { bits: 4, .. })
        ));
        // bitfield size 0 with kind_flag: an ordinary member.
        assert_eq!(btf.member_offset("bits", "full").unwrap(), 3);
        assert_eq!(btf.member_size("bits", "full").unwrap(), 1);
    }

    #[test]
    fn int_encoded_bitfields() {
        let btf = Btf::from_bytes(&sample(false)).unwrap();
        let err = btf.member_offset("oldbits", "a").unwrap_err();
        assert!(
            matches!(err, BtfError::NotByteAligned { bit_offset: 35, .. }),
            "{err}"
        );
        assert!(matches!(
            btf.member_size("oldbits", "a"),
            Err(BtfError::BitField { bits: 3, .. })
        ));
    }

    #[test]
    fn picks_first_complete_struct() {
        let btf = Btf::from_bytes(&sample(false)).unwrap();
        assert_eq!(btf.member_offset("dup", "first").unwrap(), 0);
        assert!(matches!(
            btf.member_offset("dup", "u"),
            Err(BtfError::MemberNotFound { .. })
        ));
        // `common` has a forward declaration before its definition.
        assert_eq!(btf.member_offset("common", "dport").unwrap(), 8);
    }

    #[test]
    fn lookup_errors_say_what_is_missing() {
        let btf = Btf::from_bytes(&sample(false)).unwrap();
        let err = btf.member_offset("outer", "c.nope").unwrap_err();
        assert!(matches!(&err, BtfError::MemberNotFound { member, .. } if member == "nope"));
        assert!(err.to_string().contains("outer.c.nope"), "{err}");
        assert!(err.to_string().contains("no member nope"), "{err}");

        let err = btf.member_offset("missing", "x").unwrap_err();
        assert!(matches!(err, BtfError::StructNotFound { .. }));
        assert!(
            err.to_string()
                .contains("struct missing is not in the kernel's BTF"),
            "{err}"
        );

        let err = btf.member_offset("only_declared", "x").unwrap_err();
        assert!(matches!(err, BtfError::OnlyDeclared { .. }), "{err}");

        let err = btf.member_offset("outer", "x.y").unwrap_err();
        assert!(
            matches!(&err, BtfError::NotComposite { member, .. } if member == "x"),
            "{err}"
        );

        assert!(matches!(
            btf.member_offset("outer", ""),
            Err(BtfError::EmptyPath { .. })
        ));
        assert!(matches!(
            btf.member_offset("outer", "c..x"),
            Err(BtfError::EmptyPath { .. })
        ));
    }

    #[test]
    fn rejects_bad_data() {
        let good = sample(false);
        assert!(matches!(
            Btf::from_bytes(&good[..10]),
            Err(BtfError::Malformed(_))
        ));
        let mut bad_magic = good.clone();
        bad_magic[0] = 0;
        let err = Btf::from_bytes(&bad_magic).err().unwrap();
        assert!(err.to_string().contains("bad magic"), "{err}");
        // Cut the string section short: the header now points past the end.
        assert!(matches!(
            Btf::from_bytes(&good[..good.len() - 1]),
            Err(BtfError::Malformed(_))
        ));
        // An unknown kind.
        let mut b = Builder::new(false);
        b.head("x", 31, 0, false, 0);
        assert!(matches!(
            Btf::from_bytes(&b.build()),
            Err(BtfError::UnknownKind { id: 1, kind: 31 })
        ));
        // A struct whose members run past the type section.
        let mut b = Builder::new(false);
        b.head("x", kind::STRUCT, 3, false, 4);
        assert!(matches!(
            Btf::from_bytes(&b.build()),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn missing_file_is_reported() {
        let err = Btf::from_file("/nonexistent/btf").err().unwrap();
        assert!(matches!(err, BtfError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/btf"), "{err}");
    }

    #[test]
    fn size_mismatch_names_the_field() {
        let btf = Btf::from_bytes(&sample(false)).unwrap();
        let err = field(&btf, "outer", "c.daddr", 2).unwrap_err();
        assert!(matches!(
            err,
            BtfError::SizeMismatch {
                expected: 2,
                actual: 4,
                ..
            }
        ));
        assert!(
            err.to_string().contains("outer.c.daddr is 4 bytes"),
            "{err}"
        );
        assert_eq!(field(&btf, "outer", "p", 0).unwrap(), 40);
    }
}
