//! sonde's eBPF programs: socket I/O capture (syscall tracepoints or kprobes) and
//! process lifecycle. See `probes/` for the hooks and `maps.rs` for the state.
#![no_std]
#![no_main]
// For the fetching atomic add in emit.rs, written as inline assembly.
#![feature(asm_experimental_arch)]

mod branchless;
mod config;
mod emit;
mod http_follow;
mod maps;
mod probes;
mod socket;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
