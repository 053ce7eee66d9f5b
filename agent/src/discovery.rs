//! Discovery, on a thread of its own: the work the event loop must not wait for.
//!
//! Reading /proc to name a new process, and looking for TLS code in the files processes
//! run (ELF symbol tables; Go's RET instructions, found by decoding its functions) take
//! from microseconds to tens of milliseconds a file, while the event loop drains the
//! ring buffer. So the loop sends [`Request`]s to this thread over a bounded channel
//! ([`Discovery::send`]; when it is full the request is dropped and counted in
//! `sonde_discovery_requests_dropped_total`), and takes what the thread [`Found`] from a
//! bounded channel the thread waits on (nothing is dropped on the way back). Attaching
//! uprobes to the TLS targets found stays with the loop, which owns the probes.
//!
//! Identities go first: a request to name a process is answered before the next process
//! is looked at for TLS code. The thread starts with the library directories and every
//! running process, and says when that start-up scan is done ([`Found::StartupScanned`]:
//! every target it found was sent before). New processes are scanned before the rest.

use std::{
    collections::{HashSet, VecDeque},
    path::PathBuf,
    sync::{
        Arc,
        mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError},
    },
    thread::JoinHandle,
};

use tokio::sync::mpsc as async_mpsc;
use tracing::warn;

use crate::{
    probes::tls::{LIBRARY_DIRS, TlsDiscovery, TlsTarget},
    process::{Describer, Identified, ProcessQuery},
    selection::{ProcessRules, read_facts},
    telemetry::Metrics,
};

/// Requests waiting for the discovery thread; past this they are dropped and counted.
const REQUEST_QUEUE: usize = 4096;
/// Findings waiting for the event loop; past this the thread waits.
const FOUND_QUEUE: usize = 1024;

/// What the event loop asks of the discovery thread.
#[derive(Debug)]
pub enum Request {
    /// Read a process's identity from /proc, then look for TLS code in it.
    Process(ProcessQuery),
    /// Look again at these processes, for TLS libraries they loaded since.
    Rescan(Vec<u32>),
}

/// What the discovery thread sends back.
#[derive(Debug)]
pub enum Found {
    Identity(Identified),
    Tls(TlsTarget),
    /// The start-up scan is over: every target it found was sent before this.
    StartupScanned,
    /// A process a selection rule of the config file excludes: the kernel is to leave
    /// it alone from now on.
    Excluded(u32),
}

/// Where the discovery thread looks.
#[derive(Clone, Debug)]
pub struct Roots {
    /// The /proc tree (a fake one in tests).
    pub proc_root: PathBuf,
    /// Directories whose libssl files are probed whether or not a process maps them.
    pub library_dirs: Vec<PathBuf>,
    /// The config file's identity and selection rules.
    pub rules: Arc<ProcessRules>,
}

impl Default for Roots {
    /// This machine's /proc, and the directories where distributions keep libssl.
    fn default() -> Self {
        Roots {
            proc_root: PathBuf::from("/proc"),
            library_dirs: LIBRARY_DIRS.iter().map(PathBuf::from).collect(),
            rules: Arc::default(),
        }
    }
}

/// The event loop's end of the discovery thread.
pub struct Discovery {
    requests: Option<SyncSender<Request>>,
    found: async_mpsc::Receiver<Found>,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl Discovery {
    /// Starts the thread; it begins with the start-up scan.
    pub fn spawn(roots: Roots, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let (requests, inbox) = mpsc::sync_channel(REQUEST_QUEUE);
        let (outbox, found) = async_mpsc::channel(FOUND_QUEUE);
        let worker = Worker {
            describer: Describer::new(&roots.proc_root).with_rules(roots.rules.clone()),
            proc_root: roots.proc_root.clone(),
            rules: roots.rules,
            tls: TlsDiscovery::new(&roots.proc_root, roots.library_dirs),
            jobs: VecDeque::from([Job::Libraries, Job::AllProcesses, Job::StartupDone]),
            queued: HashSet::new(),
            inbox,
            outbox,
        };
        let thread = std::thread::Builder::new()
            .name("sonde-discovery".into())
            .spawn(move || worker.run())?;
        Ok(Discovery {
            requests: Some(requests),
            found,
            thread: Some(thread),
            metrics,
        })
    }

    /// Queues a request without waiting; a full queue drops it, counted.
    pub fn send(&self, request: Request) {
        let Some(requests) = &self.requests else {
            return;
        };
        match requests.try_send(request) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                Metrics::inc(&self.metrics.discovery_requests_dropped);
            }
        }
    }

    /// The next finding; None once the thread has ended.
    pub async fn next(&mut self) -> Option<Found> {
        self.found.recv().await
    }

    /// The next finding if one is waiting.
    pub fn try_next(&mut self) -> Option<Found> {
        self.found.try_recv().ok()
    }
}

impl Drop for Discovery {
    /// Stops the thread once it has finished the file it is looking at.
    fn drop(&mut self) {
        self.requests = None;
        // Unblocks a thread waiting to send.
        self.found.close();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("the discovery thread panicked");
        }
    }
}

enum Job {
    Libraries,
    AllProcesses,
    Scan(u32),
    StartupDone,
}

struct Worker {
    describer: Describer,
    proc_root: PathBuf,
    rules: Arc<ProcessRules>,
    tls: TlsDiscovery,
    jobs: VecDeque<Job>,
    /// Pids with a `Job::Scan` queued.
    queued: HashSet<u32>,
    inbox: Receiver<Request>,
    outbox: async_mpsc::Sender<Found>,
}

impl Worker {
    fn run(mut self) {
        loop {
            // Take every request waiting (identities are answered as they come), then
            // do one job.
            loop {
                let request = if self.jobs.is_empty() {
                    self.inbox.recv().ok()
                } else {
                    match self.inbox.try_recv() {
                        Ok(r) => Some(r),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => None,
                    }
                };
                let Some(request) = request else {
                    return;
                };
                if !self.take(request) {
                    return;
                }
            }
            let Some(job) = self.jobs.pop_front() else {
                continue;
            };
            if !self.work(job) {
                return;
            }
        }
    }

    /// False once the event loop is gone.
    fn take(&mut self, request: Request) -> bool {
        match request {
            Request::Process(query) => {
                if !self.rules.exclude.is_empty()
                    && read_facts(&self.proc_root, query.pid)
                        .is_some_and(|f| self.rules.excludes(&f))
                    && !self.send(Found::Excluded(query.pid))
                {
                    return false;
                }
                let resource = self.describer.describe(query.pid, query.exec.as_ref());
                let answer = Identified {
                    pid: query.pid,
                    generation: query.generation,
                    resource,
                };
                if !self.send(Found::Identity(answer)) {
                    return false;
                }
                // A new program may carry TLS code: before rescans and the start-up scan.
                if self.queued.insert(query.pid) {
                    self.jobs.push_front(Job::Scan(query.pid));
                }
            }
            Request::Rescan(pids) => {
                for pid in pids {
                    if self.queued.insert(pid) {
                        self.jobs.push_back(Job::Scan(pid));
                    }
                }
            }
        }
        true
    }

    fn work(&mut self, job: Job) -> bool {
        let targets = match job {
            Job::Libraries => self.tls.scan_library_dirs(),
            Job::AllProcesses => {
                // One job per process, ahead of the end-of-start-up marker, so that
                // requests are answered between them.
                for pid in self.tls.running_processes().into_iter().rev() {
                    if self.queued.insert(pid) {
                        self.jobs.push_front(Job::Scan(pid));
                    }
                }
                Vec::new()
            }
            Job::Scan(pid) => {
                self.queued.remove(&pid);
                self.tls.scan_process(pid)
            }
            Job::StartupDone => return self.send(Found::StartupScanned),
        };
        targets.into_iter().all(|t| self.send(Found::Tls(t)))
    }

    fn send(&self, found: Found) -> bool {
        self.outbox.blocking_send(found).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink, path::Path};

    use super::*;
    use crate::process::ExecHint;

    // TLS functions of this test binary, so that its own file is a TLS target the
    // discovery thread must find when a fake process runs it.
    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn SSL_read(_ssl: *mut u8, _buf: *mut u8, _num: i32) -> i32 {
        0
    }

    #[unsafe(no_mangle)]
    #[inline(never)]
    pub extern "C" fn SSL_write(_ssl: *mut u8, _buf: *const u8, _num: i32) -> i32 {
        0
    }

    /// A process directory in a fake /proc: its files, `exe` pointing at `exe`, and
    /// `root` at the real root (paths inside the process are the machine's).
    fn fake_process(proc_root: &Path, pid: u32, exe: &Path, comm: &str, environ: &[u8]) {
        let dir = proc_root.join(pid.to_string());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        fs::write(dir.join("cmdline"), format!("{comm}\0serve\0")).unwrap();
        fs::write(dir.join("environ"), environ).unwrap();
        fs::write(dir.join("maps"), "").unwrap();
        symlink(exe, dir.join("exe")).unwrap();
        symlink("/", dir.join("root")).unwrap();
    }

    fn next(d: &mut Discovery) -> Found {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(found) = d.try_next() {
                return found;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nothing found within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn names_processes_from_proc_and_finds_the_tls_code_they_run() {
        let tmp = tempfile::tempdir().unwrap();
        let proc_root = tmp.path().join("proc");
        let libs = tmp.path().join("lib");
        fs::create_dir_all(&libs).unwrap();
        let not_elf = tmp.path().join("script.txt");
        fs::write(&not_elf, "#!/bin/sh\n").unwrap();
        fake_process(&proc_root, 4242, &not_elf, "old-server", b"PATH=/bin\0");
        let this_binary = std::env::current_exe().unwrap();
        // Referenced, so that the linker keeps them.
        std::hint::black_box((SSL_read as *const (), SSL_write as *const ()));

        let mut d = Discovery::spawn(
            Roots {
                proc_root: proc_root.clone(),
                library_dirs: vec![libs],
                rules: Arc::default(),
            },
            Arc::new(Metrics::default()),
        )
        .unwrap();
        // Nothing with TLS code runs at start-up.
        assert!(matches!(next(&mut d), Found::StartupScanned));

        // A new process that runs this binary, with its own service name.
        fake_process(
            &proc_root,
            4243,
            &this_binary,
            "shop",
            b"PATH=/bin\0OTEL_SERVICE_NAME=shop-api\0",
        );
        let exec = ExecHint {
            comm: "shop".into(),
            args: vec!["shop".into()],
            env: vec![],
        };
        d.send(Request::Process(ProcessQuery {
            pid: 4243,
            generation: 7,
            exec: Some(exec.clone()),
        }));
        // Its identity comes first, then its TLS code.
        match next(&mut d) {
            Found::Identity(a) => {
                assert_eq!((a.pid, a.generation), (4243, 7));
                let r = a.resource.expect("/proc has the process");
                assert_eq!(r.service_name, "shop-api");
                assert_eq!(r.pid, 4243);
            }
            other => panic!("expected the identity first, got {other:?}"),
        }
        match next(&mut d) {
            Found::Tls(t) => {
                assert_eq!(
                    fs::canonicalize(&t.path).unwrap(),
                    fs::canonicalize(&this_binary).unwrap()
                );
                assert!(t.symbols.ssl_read.is_some() && t.symbols.ssl_write.is_some());
            }
            other => panic!("expected the process's TLS target, got {other:?}"),
        }

        // Gone from /proc, or running another program than its exec event says: no
        // identity from /proc.
        for (pid, comm) in [(4299, "shop"), (4243, "other")] {
            d.send(Request::Process(ProcessQuery {
                pid,
                generation: 8,
                exec: Some(ExecHint {
                    comm: comm.into(),
                    ..exec.clone()
                }),
            }));
            match next(&mut d) {
                Found::Identity(a) => assert!(a.resource.is_none(), "{pid} {comm}: {a:?}"),
                other => panic!("expected an identity, got {other:?}"),
            }
        }
        // A process first seen without its exec event is named from /proc alone.
        d.send(Request::Process(ProcessQuery {
            pid: 4242,
            generation: 9,
            exec: None,
        }));
        match next(&mut d) {
            Found::Identity(a) => {
                assert_eq!(a.resource.unwrap().service_name, "script.txt")
            }
            other => panic!("expected an identity, got {other:?}"),
        }
        drop(d);
    }

    #[test]
    fn a_full_request_queue_drops_and_counts() {
        let metrics = Arc::new(Metrics::default());
        let (requests, _inbox) = mpsc::sync_channel(1);
        let (_outbox, found) = async_mpsc::channel(1);
        let d = Discovery {
            requests: Some(requests),
            found,
            thread: None,
            metrics: metrics.clone(),
        };
        d.send(Request::Rescan(vec![1]));
        d.send(Request::Rescan(vec![2]));
        assert_eq!(
            metrics
                .discovery_requests_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
