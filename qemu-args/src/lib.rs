//! qemu-args: how to run an appliance on stock QEMU, as data.
//!
//! * [`machine`] — the machine description (`machine.json`, format `vastream-machine-v2`,
//!   v1 still read): [`Machine::parse`] decodes untrusted bytes, [`Machine::to_json`] writes,
//!   [`Machine::cold_boot`] describes a disk-only appliance.
//! * [`vm`] — the typed VM: [`Vm::from_machine`] combines a description with what the
//!   launcher provides ([`Attachments`]: vhost-user sockets, the RAM file, the device state,
//!   kernel/initrd paths, QMP, console, accelerator, ...) and validates it: anything QEMU
//!   could not accept, or that could not restore the saved state, is a [`VmError`] naming the
//!   field.
//! * [`argv`] — [`Vm::argv`] (a `Vec<String>`, no shell involved), [`Vm::command`] (program
//!   first), [`Vm::shell_line`] (one shell-quoted line).
//! * [`qmp`] — [`Vm::resume_steps`]: the QMP steps that resume a snapshot, as data
//!   ([`Step`], serialisable to JSON).
//! * [`libvirt`] — [`Vm::libvirt_xml`]: the same VM as a libvirt domain (and what libvirt
//!   cannot express: see the module docs).
//!
//! ```
//! use qemu_args::{Accel, Attachments, Machine, Vm};
//!
//! let machine = Machine::cold_boot(1 << 30, 2, Some("console=ttyS0 root=/dev/vda rw".into()));
//! let vm = Vm::from_machine(&machine, &Attachments {
//!     accel: Accel::Tcg,
//!     blk_sockets: vec!["/run/vablk.sock".into()],
//!     kernel: Some("/var/lib/va/kernel".into()),
//!     ..Attachments::default()
//! })?;
//! let argv = vm.argv()?;
//! assert!(argv.contains(&"vhost-user-blk-pci,id=vablk0,chardev=chr-vablk0,num-queues=1".to_string()));
//! # Ok::<(), qemu_args::VmError>(())
//! ```

#![warn(missing_docs)]

pub mod argv;
pub mod libvirt;
pub mod machine;
pub mod qmp;
pub mod vm;

pub use argv::{shell_join, shell_quote, QEMU};
pub use machine::{Device, DeviceKind, Machine, MachineError, PropValue};
pub use qmp::{Step, WaitState};
pub use vm::{
    disk_name, disk_number, Accel, Attachments, Backend, BootImages, Console, KernelBoot, NbdDisk,
    NbdServer, Ram, RamBackend, UserNet, Vm, VmDevice, VmError,
};
