//! The test guest: a kernel and two initrds (one with fio) built by `va-tests/guest/build.sh`
//! into `target/guest`, once per test process. Its `init` runs the tests named by `va.test=`
//! and prints `VA-RESULT` / `VA-MEM` lines on the console (see `va-tests/guest/init`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::bins::{profile_dir, require_tool, workspace_root};

/// Paths of the built test guest.
pub struct Guest {
    /// The kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The initrd with busybox and the test init.
    pub initrd: PathBuf,
    /// The same with fio added.
    pub initrd_fio: PathBuf,
}

/// The test guest, built on first use in this process (build.sh itself reuses an up-to-date
/// build); fails with a clear message when a tool it needs is missing.
pub fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        for t in ["qemu-system-x86_64", "busybox", "cpio", "fio", "sha256sum"] {
            require_tool(t);
        }
        let out = profile_dir()
            .parent()
            .expect("target/<profile> has a parent")
            .join("guest");
        let status = Command::new("bash")
            .arg(workspace_root().join("va-tests/guest/build.sh"))
            .arg(&out)
            .status()
            .expect("running va-tests/guest/build.sh");
        assert!(
            status.success(),
            "va-tests/guest/build.sh {} failed",
            out.display()
        );
        Guest {
            kernel: out.join("vmlinuz"),
            initrd: out.join("initrd.gz"),
            initrd_fio: out.join("initrd-fio.gz"),
        }
    })
}
