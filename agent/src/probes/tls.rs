//! Finding TLS libraries to put uprobes on: OpenSSL (libssl.so.3, libssl.so.1.1, and
//! BIO_write in libcrypto beside it) and executables that carry OpenSSL or BoringSSL
//! statically and keep its symbols (Node.js does), found by their SSL_read/SSL_write
//! symbols with the `object` crate.
//!
//! Go programs carry their own TLS (crypto/tls): `(*Conn).Read` and `(*Conn).Write`
//! are found in the symbol table, and their RET instructions by decoding the function
//! (iced-x86), because Go functions must not get uretprobes.
//!
//! A uprobe is attached to a file (its inode), so every process that maps the file is
//! covered, including processes that start later. Each file is examined once.

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ReadCache, ReadRef};
use tracing::{debug, info};

/// File offsets of the TLS functions in one ELF file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSymbols {
    pub ssl_read: Option<u64>,
    pub ssl_write: Option<u64>,
    pub ssl_read_ex: Option<u64>,
    pub ssl_write_ex: Option<u64>,
    /// SSL_do_handshake: a call in flight, so that the records its handshake writes
    /// (BIO_write) are known as the session's before any data moves.
    pub ssl_do_handshake: Option<u64>,
    /// SSL_free: a freed session's address is often the next one's.
    pub ssl_free: Option<u64>,
    /// BIO_write (libcrypto, or an executable with OpenSSL inside): the records a
    /// memory-BIO session produces, by which its socket write is recognised.
    pub bio_write: Option<u64>,
    /// Go crypto/tls: entries of (*Conn).Read and (*Conn).Write, and every RET
    /// instruction of both.
    pub go: Option<GoTls>,
    /// A Go program with net/http: where its goroutines are followed.
    pub goroutines: Option<GoRoutines>,
}

/// The Go functions by which a program's socket I/O is told apart by goroutine (see
/// agent-ebpf's probes/goroutines.rs), as file offsets: entries, and the RET
/// instructions of those whose return is needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GoRoutines {
    pub fd_read: u64,
    pub fd_write: u64,
    pub round_trip: Option<u64>,
    pub request_write: Option<u64>,
    pub serve: Option<(u64, Vec<u64>)>,
    pub newproc: Option<(u64, Vec<u64>)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GoTls {
    pub read: u64,
    pub write: u64,
    pub returns: Vec<u64>,
}

impl TlsSymbols {
    pub fn is_usable(&self) -> bool {
        (self.ssl_read.is_some() && self.ssl_write.is_some())
            || self.go.is_some()
            || self.goroutines.is_some()
            || self.bio_write.is_some()
    }

    fn has_openssl(&self) -> bool {
        self.ssl_read.is_some() && self.ssl_write.is_some()
    }
}

const GO_TLS_READ: &str = "crypto/tls.(*Conn).Read";
const GO_TLS_WRITE: &str = "crypto/tls.(*Conn).Write";
const GO_FD_READ: &str = "internal/poll.(*FD).Read";
const GO_FD_WRITE: &str = "internal/poll.(*FD).Write";
const GO_ROUND_TRIP: &str = "net/http.(*persistConn).roundTrip";
const GO_REQUEST_WRITE: &str = "net/http.(*Request).write";
const GO_SERVE: &str = "net/http.serverHandler.ServeHTTP";
const GO_NEWPROC: &str = "runtime.newproc1";
const GO_FUNCTIONS: [&str; 8] = [
    GO_TLS_READ,
    GO_TLS_WRITE,
    GO_FD_READ,
    GO_FD_WRITE,
    GO_ROUND_TRIP,
    GO_REQUEST_WRITE,
    GO_SERVE,
    GO_NEWPROC,
];

/// The TLS functions defined (not merely imported) in the ELF file at `path`, as file
/// offsets, or None when it has none.
///
/// The file is read with read(2), as far as needed (headers, symbol tables, the Go
/// functions' code), not mapped: the kernel writes the breakpoints of uprobes already on
/// the file (another tracer's, or another sonde's) into every new mapping of it that may
/// be executable, and the code decoded would show them where RET instructions are.
pub fn find_tls_symbols(path: &Path) -> Result<Option<TlsSymbols>, String> {
    let file = fs::File::open(path).map_err(|e| e.to_string())?;
    let data = ReadCache::new(file);
    let elf = object::File::parse(&data).map_err(|e| e.to_string())?;
    let mut found = TlsSymbols::default();
    let segments: Vec<(u64, u64, u64)> = elf
        .segments()
        .map(|s| (s.address(), s.size(), s.file_range().0))
        .collect();
    let to_offset = |addr: u64| {
        segments
            .iter()
            .find(|(va, size, _)| addr >= *va && addr < va + size)
            .map(|(va, _, off)| addr - va + off)
    };
    let mut go_functions: Vec<(&str, u64, u64)> = Vec::new();
    for sym in elf.dynamic_symbols().chain(elf.symbols()) {
        if sym.is_undefined() || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if GO_FUNCTIONS.contains(&name) {
            go_functions.push((name, sym.address(), sym.size()));
            continue;
        }
        let slot = match name {
            "SSL_read" => &mut found.ssl_read,
            "SSL_write" => &mut found.ssl_write,
            "SSL_read_ex" => &mut found.ssl_read_ex,
            "SSL_write_ex" => &mut found.ssl_write_ex,
            "SSL_do_handshake" => &mut found.ssl_do_handshake,
            "SSL_free" => &mut found.ssl_free,
            "BIO_write" => &mut found.bio_write,
            _ => continue,
        };
        if slot.is_none() {
            *slot = to_offset(sym.address());
        }
    }
    if !go_functions.is_empty() && elf.architecture() == object::Architecture::X86_64 {
        found.go = go_tls(&elf, &data, &go_functions, &to_offset);
        found.goroutines = go_routines(&elf, &data, &go_functions, &to_offset);
    }
    // BIO_write alone is worth a probe only in libcrypto, which libssl calls: a program
    // with libcrypto's BIOs but no TLS of its own would only pay for it.
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    if !found.has_openssl() && !is_libcrypto(&name) {
        found.bio_write = None;
    }
    Ok(found.is_usable().then_some(found))
}

/// The entry of the Go function `name` among `functions` (name, address, size), as a
/// file offset.
fn go_entry(
    functions: &[(&str, u64, u64)],
    name: &str,
    to_offset: &impl Fn(u64) -> Option<u64>,
) -> Option<u64> {
    let &(_, addr, _) = functions.iter().find(|(n, _, _)| *n == name)?;
    to_offset(addr)
}

/// The entry and the RET instructions of the Go function `name` among `functions`
/// (name, address, size), as file offsets.
fn go_function<'data, R: ReadRef<'data>>(
    elf: &object::File<'data, R>,
    data: R,
    functions: &[(&str, u64, u64)],
    name: &str,
    to_offset: &impl Fn(u64) -> Option<u64>,
) -> Option<(u64, Vec<u64>)> {
    let &(_, addr, size) = functions.iter().find(|(n, _, _)| *n == name)?;
    let text = elf.section_by_name(".text")?;
    let (text_off, _) = text.file_range()?;
    let entry = to_offset(addr)?;
    let start = addr.checked_sub(text.address())? + text_off;
    let code = data.read_bytes_at(start, size).ok()?;
    let returns: Vec<u64> = ret_offsets(code, addr)
        .into_iter()
        .filter_map(to_offset)
        .collect();
    (!returns.is_empty()).then_some((entry, returns))
}

/// Entries and RET instructions of Go's TLS read and write, as file offsets.
fn go_tls<'data, R: ReadRef<'data>>(
    elf: &object::File<'data, R>,
    data: R,
    functions: &[(&str, u64, u64)],
    to_offset: &impl Fn(u64) -> Option<u64>,
) -> Option<GoTls> {
    let (read, mut returns) = go_function(elf, data, functions, GO_TLS_READ, to_offset)?;
    let (write, more) = go_function(elf, data, functions, GO_TLS_WRITE, to_offset)?;
    returns.extend(more);
    Some(GoTls {
        read,
        write,
        returns,
    })
}

/// Where a Go program with net/http is followed by goroutine: poll.FD's Read and
/// Write must be there, the others are used when they are (a function the compiler
/// inlined everywhere has no symbol).
fn go_routines<'data, R: ReadRef<'data>>(
    elf: &object::File<'data, R>,
    data: R,
    functions: &[(&str, u64, u64)],
    to_offset: &impl Fn(u64) -> Option<u64>,
) -> Option<GoRoutines> {
    let entry = |name| go_entry(functions, name, to_offset);
    let serve = go_function(elf, data, functions, GO_SERVE, to_offset);
    let round_trip = entry(GO_ROUND_TRIP);
    if serve.is_none() && round_trip.is_none() {
        return None;
    }
    Some(GoRoutines {
        fd_read: entry(GO_FD_READ)?,
        fd_write: entry(GO_FD_WRITE)?,
        round_trip,
        request_write: entry(GO_REQUEST_WRITE),
        serve,
        newproc: go_function(elf, data, functions, GO_NEWPROC, to_offset),
    })
}

/// Addresses of the RET instructions in x86-64 machine code loaded at `address`.
fn ret_offsets(code: &[u8], address: u64) -> Vec<u64> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let instr = decoder.decode();
        if instr.mnemonic() == Mnemonic::Ret {
            out.push(instr.ip());
        }
    }
    out
}

/// A file found to hold TLS functions, to attach to.
#[derive(Clone, Debug)]
pub struct TlsTarget {
    /// Path to open, through /proc/PID/root for files inside containers.
    pub path: PathBuf,
    pub symbols: TlsSymbols,
}

/// Finds TLS targets in library directories and in processes (through a /proc tree),
/// and remembers which files were examined, by (device, inode).
pub struct TlsDiscovery {
    proc_root: PathBuf,
    library_dirs: Vec<PathBuf>,
    examined: HashSet<(u64, u64)>,
}

/// Directories where distributions keep libssl.
pub const LIBRARY_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/usr/local/ssl/lib",
];

fn is_libssl(name: &str) -> bool {
    name.starts_with("libssl.so") || name.starts_with("libboringssl")
}

fn is_libcrypto(name: &str) -> bool {
    name.starts_with("libcrypto.so")
}

/// A TLS library, or the crypto library its records go through.
fn is_tls_library(name: &str) -> bool {
    is_libssl(name) || is_libcrypto(name)
}

impl TlsDiscovery {
    pub fn new(proc_root: impl Into<PathBuf>, library_dirs: Vec<PathBuf>) -> Self {
        TlsDiscovery {
            proc_root: proc_root.into(),
            library_dirs,
            examined: HashSet::new(),
        }
    }

    /// The host's own libssl files, whether or not a process maps them yet.
    pub fn scan_library_dirs(&mut self) -> Vec<TlsTarget> {
        let mut out = Vec::new();
        for dir in self.library_dirs.clone() {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                if is_tls_library(&e.file_name().to_string_lossy()) {
                    out.extend(self.examine(&e.path()));
                }
            }
        }
        out
    }

    /// The pids of every running process.
    pub fn running_processes(&self) -> Vec<u32> {
        fs::read_dir(&self.proc_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
            .collect()
    }

    /// One process's mapped libssl files and its executable.
    pub fn scan_process(&mut self, pid: u32) -> Vec<TlsTarget> {
        if pid == std::process::id() {
            return Vec::new();
        }
        let dir = self.proc_root.join(pid.to_string());
        let root = dir.join("root");
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Ok(exe) = fs::read_link(dir.join("exe")) {
            candidates.push(exe);
        }
        if let Ok(maps) = fs::read_to_string(dir.join("maps")) {
            for line in maps.lines() {
                let Some(path) = line.split_whitespace().nth(5) else {
                    continue;
                };
                let name = path.rsplit('/').next().unwrap_or(path);
                if path.starts_with('/') && is_tls_library(name) {
                    candidates.push(PathBuf::from(path));
                }
            }
        }
        candidates.sort();
        candidates.dedup();
        let mut out = Vec::new();
        for c in candidates {
            let inside = root.join(c.strip_prefix("/").unwrap_or(&c));
            out.extend(self.examine(&inside));
        }
        out
    }

    fn examine(&mut self, path: &Path) -> Option<TlsTarget> {
        let meta = fs::metadata(path).ok()?;
        if !meta.is_file() || !self.examined.insert((meta.dev(), meta.ino())) {
            return None;
        }
        match find_tls_symbols(path) {
            Ok(Some(symbols)) => {
                info!(
                    path = %path.display(),
                    openssl = symbols.has_openssl(),
                    bio_write = symbols.bio_write.is_some(),
                    go = symbols.go.is_some(),
                    goroutines = symbols.goroutines.is_some(),
                    "TLS functions found"
                );
                Some(TlsTarget {
                    path: path.to_owned(),
                    symbols,
                })
            }
            Ok(None) => {
                if is_libssl(&path.file_name().unwrap_or_default().to_string_lossy()) {
                    info!(path = %path.display(), "no SSL_read/SSL_write symbols in this TLS library; skipped");
                } else {
                    debug!(path = %path.display(), "no TLS functions");
                }
                None
            }
            Err(e) => {
                debug!(path = %path.display(), error = %e, "not an ELF file we can read; skipped");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_libssl_has_the_functions_and_curl_only_imports_them() {
        let mut d = TlsDiscovery::new("/proc", LIBRARY_DIRS.iter().map(PathBuf::from).collect());
        let found = d.scan_library_dirs();
        let libssl3 = found
            .iter()
            .find(|t| fs::canonicalize(&t.path).is_ok_and(|p| p.ends_with("libssl.so.3")))
            .expect("libssl.so.3 is installed on the build machine (Debian's libssl3)");
        assert!(libssl3.symbols.ssl_read_ex.is_some() && libssl3.symbols.ssl_write_ex.is_some());
        assert!(libssl3.symbols.ssl_do_handshake.is_some() && libssl3.symbols.ssl_free.is_some());
        let libcrypto3 = found
            .iter()
            .find(|t| fs::canonicalize(&t.path).is_ok_and(|p| p.ends_with("libcrypto.so.3")))
            .expect("libcrypto.so.3 is installed beside libssl.so.3");
        assert!(libcrypto3.symbols.bio_write.is_some() && !libcrypto3.symbols.has_openssl());
        assert_ne!(libssl3.symbols.ssl_read, libssl3.symbols.ssl_write);
        // curl links libssl dynamically: it imports SSL_write but does not define it.
        assert_eq!(find_tls_symbols(Path::new("/usr/bin/curl")).unwrap(), None);
        // A second scan finds nothing new: each file is examined once.
        assert!(d.scan_library_dirs().is_empty());
    }

    #[test]
    fn ret_instructions_are_found_by_decoding_not_by_byte_value() {
        // mov eax, 0xc3c3c3c3 ; ret ; int3 ; ret
        let code = [0xb8, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xcc, 0xc3];
        assert_eq!(ret_offsets(&code, 0x1000), vec![0x1005, 0x1007]);
    }

    #[test]
    fn non_elf_files_are_skipped_with_an_error() {
        assert!(find_tls_symbols(Path::new("/etc/hostname")).is_err());
    }
}
