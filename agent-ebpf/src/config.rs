//! The load-time settings user space writes into `.rodata` before loading.

use agent_common::ProbeConfig;

/// Overwritten by the loader (`EbpfLoader::override_global`); all zeros here.
#[unsafe(no_mangle)]
pub(crate) static CONFIG: ProbeConfig = unsafe { core::mem::zeroed() };

/// Reads one field of [`CONFIG`] with a volatile load, so that the compiler cannot fold
/// the zeros of the object file into the code.
macro_rules! setting {
    ($($field:ident).+) => {
        unsafe { core::ptr::read_volatile(&raw const $crate::config::CONFIG.$($field).+) }
    };
}
pub(crate) use setting;
