//! Arithmetic on bytes without branches, for code that reads a message's head.
//!
//! The verifier follows every branch whose outcome depends on data, and over a head
//! of a few kilobytes that is more paths than it accepts. These helpers turn tests on
//! bytes into 0/1 values instead. `opaque` hides each value from the optimiser, which
//! would otherwise turn the arithmetic back into comparisons (branches: BPF has no
//! conditional set).
//!
//! Both program binaries include this module, each for a part of it.
#![allow(dead_code)]

#[inline(always)]
pub fn opaque(mut x: u64) -> u64 {
    // SAFETY: a move of the register to itself: it is returned as it was.
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) x, options(pure, nomem, nostack)) };
    x
}

/// An index into a buffer of `N` bytes (a power of two), masked where the verifier
/// sees it (the optimiser would drop a mask it can prove redundant, and fold the index
/// into a pointer the verifier cannot bound).
#[inline(always)]
pub fn masked<const N: usize>(i: usize) -> usize {
    (opaque(i as u64) as usize) & (N - 1)
}

/// 1 when `x` is 0, else 0: `(x - 1) & !x`, its top bit. In assembly, because the
/// optimiser knows that idiom and would make it a comparison again.
#[inline(always)]
pub fn is_zero(x: u64) -> u64 {
    let r: u64;
    // SAFETY: register arithmetic only.
    unsafe {
        core::arch::asm!(
            "{r} = {x}",
            "{r} += -1",
            "{x} ^= -1",
            "{r} &= {x}",
            "{r} >>= 63",
            x = inout(reg) x => _,
            r = out(reg) r,
            options(pure, nomem, nostack),
        )
    };
    r
}

/// 1 when `a < b` (both below 2^62), else 0.
#[inline(always)]
pub fn below(a: u64, b: u64) -> u64 {
    (opaque(a).wrapping_sub(opaque(b))) >> 63
}

/// 1 when `lo <= b <= hi` (all below 2^62), else 0.
#[inline(always)]
pub fn in_range(b: u64, lo: u64, hi: u64) -> u64 {
    below(b, hi + 1) & (1 ^ below(b, lo))
}

/// `new` when `bit` is 1, `old` when it is 0.
#[inline(always)]
pub fn pick(bit: u64, new: u64, old: u64) -> u64 {
    let mask = 0u64.wrapping_sub(opaque(bit));
    (new & mask) | (old & !mask)
}

/// 1 when `name` (lower case letters, `-`, `:`, `/`, digits) starts at `at` in `buf`,
/// letters in any case.
#[inline(always)]
pub fn name_at<const N: usize>(buf: &[u8; N], at: usize, name: &[u8]) -> u64 {
    let mut diff = 0u64;
    let mut j = 0;
    while j < name.len() {
        let b = buf[masked::<N>(at + j)] as u64;
        let fold = if name[j].is_ascii_lowercase() {
            0x20
        } else {
            0
        };
        diff |= (b | fold) ^ name[j] as u64;
        j += 1;
    }
    is_zero(diff)
}
