//! The one test harness of the workspace: everything the end-to-end tests of `vablk`, `vanbd`,
//! `vamem` and `va` share.
//!
//! - [`bins`]: the built binaries, running `va` and the Debian tools, required tools.
//! - [`process`]: child processes killed on drop, collected output lines, waits with timeouts.
//! - [`origin`]: `va serve`, `va wan` and nginx as an appliance origin.
//! - [`guest`]: the test guest (kernel + initrds), built once per test process.
//! - [`qemu`]: a QEMU process running the test guest, its boot options, snapshots and restores.
//! - [`qmp`]: a minimal QMP client.
//! - [`daemons`]: `vablk`, `vanbd` and `vamem` process handles.
//! - [`images`]: test disk images and sha256 helpers.
//!
//! Every child process is killed when its handle drops (also when a test panics), and every
//! wait has a timeout whose message shows the relevant log or console. Missing tools make
//! tests fail, never skip: run `bash scripts/setup.sh`.

#![warn(missing_docs)]

pub mod bins;
pub mod daemons;
pub mod guest;
pub mod images;
pub mod origin;
pub mod process;
pub mod qemu;
pub mod qmp;

pub use bins::{
    assert_identical, bin, fio_verify, pack, parse_map, qemu_img_compare, qemu_io, qemu_io_ok,
    require_tool, run, run_ok, va, va_ok, workspace_root,
};
pub use daemons::{refused, Daemon, Vablk, Vamem, Vanbd};
pub use guest::{guest, Guest};
pub use images::{
    du, make_image, random_disk, sha256, sha256_file, sha256_range, sparse_image, MIB,
};
pub use origin::{nginx, va_serve, va_wan, Origin};
pub use process::{free_port, output_within, unique, wait_port, wait_until, Lines, Proc};
pub use qemu::{
    result, snapshot_and_pack, snapshot_memcheck, Boot, Disk, MemcheckSnapshot, Qemu, Ram, ShmFile,
    BOOT_TIMEOUT, MEMCHECK_RAM_BYTES,
};
pub use qmp::Qmp;
