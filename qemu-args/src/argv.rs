//! A [`Vm`] as QEMU's command line: a `Vec<String>` (no shell involved) and a shell-quoted
//! line.
//!
//! Every value that goes inside a QEMU option list (`-chardev socket,path=P`, `-object
//! ...,mem-path=P`, `-device ...,prop=V`) has its commas doubled, QEMU's escape; names and
//! ids were checked by [`Vm::validate`] to hold no `,` or `=` at all. `-kernel`, `-initrd` and
//! `-append` take their value whole.

use crate::machine::PropValue;
use crate::vm::{
    chardev_id, netdev_id, node_name, Backend, Console, NbdServer, RamBackend, Vm, VmError,
};

/// The QEMU program the argv is for.
pub const QEMU: &str = "qemu-system-x86_64";

/// Doubles the commas of a value inside a QEMU option list.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// `key=value` pairs joined into one option list after `head` (values escaped).
fn opts(head: &str, pairs: &[(&str, String)]) -> String {
    let mut s = head.to_string();
    for (k, v) in pairs {
        s.push(',');
        s.push_str(k);
        s.push('=');
        s.push_str(&escape(v));
    }
    s
}

fn path_str(p: &std::path::Path) -> String {
    // Validation refused paths that are not UTF-8.
    p.to_string_lossy().into_owned()
}

impl Vm {
    /// QEMU's arguments (without the program), validated first.
    pub fn argv(&self) -> Result<Vec<String>, VmError> {
        self.validate()?;
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|x| x.to_string()));
        push(&["-name", &self.name]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        push(&["-accel", self.accel.name()]);
        push(&[
            "-machine",
            &format!("{},memory-backend={}", self.machine, self.ram.id),
        ]);
        if let Some(cpu) = &self.cpu {
            push(&["-cpu", cpu]);
        }
        push(&["-smp", &self.vcpus.to_string()]);
        push(&["-object", &self.ram_object()]);
        if let Some(k) = &self.kernel {
            push(&["-kernel", &path_str(&k.kernel)]);
            if let Some(i) = &k.initrd {
                push(&["-initrd", &path_str(i)]);
            }
            if let Some(c) = &k.append {
                push(&["-append", c]);
            }
        }
        for i in 0..self.devices.len() {
            a.extend(self.device_args(i));
        }
        let console = match &self.console {
            Console::Stdio => "stdio,id=console0".to_string(),
            Console::File(p) => opts("file", &[("id", "console0".into()), ("path", path_str(p))]),
            Console::Null => "null,id=console0".to_string(),
        };
        a.extend(["-chardev".to_string(), console]);
        a.extend(["-serial".to_string(), "chardev:console0".to_string()]);
        a.extend(self.qmp_args());
        if self.incoming.is_some() {
            a.extend(["-incoming".to_string(), "defer".to_string()]);
        }
        a.extend(self.extra_args.iter().cloned());
        Ok(a)
    }

    /// The `-object` value of the RAM backend.
    pub(crate) fn ram_object(&self) -> String {
        let size = self.ram.size.to_string();
        match &self.ram.backend {
            RamBackend::Memfd => opts(
                "memory-backend-memfd",
                &[
                    ("id", self.ram.id.clone()),
                    ("size", size),
                    ("share", "on".into()),
                ],
            ),
            RamBackend::File(p) => opts(
                "memory-backend-file",
                &[
                    ("id", self.ram.id.clone()),
                    ("size", size),
                    ("mem-path", path_str(p)),
                    ("share", "on".into()),
                ],
            ),
        }
    }

    /// The QMP monitor's arguments (none without a QMP socket).
    pub(crate) fn qmp_args(&self) -> Vec<String> {
        let Some(q) = &self.qmp else {
            return Vec::new();
        };
        let chardev = opts(
            "socket",
            &[
                ("id", "qmp0".into()),
                ("path", path_str(q)),
                ("server", "on".into()),
                ("wait", "off".into()),
            ],
        );
        vec![
            "-chardev".into(),
            chardev,
            "-mon".into(),
            "chardev=qmp0,mode=control".into(),
        ]
    }

    /// Device `i`'s arguments: its back-end (`-chardev`, `-blockdev`, `-netdev`), then its
    /// `-device`.
    pub(crate) fn device_args(&self, i: usize) -> Vec<String> {
        let d = &self.devices[i];
        let mut out: Vec<String> = Vec::new();
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(id) = &d.id {
            pairs.push(("id", id.clone()));
        }
        match &d.backend {
            Backend::None => {}
            Backend::VhostUser {
                socket,
                reconnect_ms,
            } => {
                let chr = chardev_id(i, d);
                let mut c = vec![("id", chr.clone()), ("path", path_str(socket))];
                if *reconnect_ms > 0 {
                    c.push(("reconnect-ms", reconnect_ms.to_string()));
                }
                out.extend(["-chardev".to_string(), opts("socket", &c)]);
                pairs.push(("chardev", chr));
            }
            Backend::Nbd { server, export } => {
                let node = node_name(i, d);
                let mut b = vec![("node-name", node.clone())];
                match server {
                    NbdServer::Unix(p) => {
                        b.push(("server.type", "unix".into()));
                        b.push(("server.path", path_str(p)));
                    }
                    NbdServer::Tcp { host, port } => {
                        b.push(("server.type", "inet".into()));
                        b.push(("server.host", host.clone()));
                        b.push(("server.port", port.to_string()));
                    }
                }
                b.push(("export", export.clone()));
                out.extend(["-blockdev".to_string(), opts("driver=nbd", &b)]);
                pairs.push(("drive", node));
            }
            Backend::UserNet { hostfwd } => {
                let id = netdev_id(i, d);
                let mut n = vec![("id", id.clone())];
                n.extend(hostfwd.iter().map(|h| ("hostfwd", h.clone())));
                out.extend(["-netdev".to_string(), opts("user", &n)]);
                pairs.push(("netdev", id));
            }
        }
        for (k, v) in &d.props {
            pairs.push((k.as_str(), v.render()));
        }
        out.extend(["-device".to_string(), opts(&d.driver, &pairs)]);
        out
    }

    /// The whole command line, program first.
    pub fn command(&self) -> Result<Vec<String>, VmError> {
        let mut v = vec![QEMU.to_string()];
        v.extend(self.argv()?);
        Ok(v)
    }

    /// [`Vm::argv`] as one shell-quoted line (for `eval "qemu-system-x86_64 $(...)"`, or to
    /// show a person).
    pub fn shell_line(&self) -> Result<String, VmError> {
        Ok(shell_join(&self.argv()?))
    }
}

/// Quotes one word for a POSIX shell: as it is when it holds only safe characters, else in
/// single quotes (a `'` becomes `'\''`).
pub fn shell_quote(w: &str) -> String {
    let safe = !w.is_empty()
        && w.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'_' | b'.' | b'/' | b',' | b'=' | b':' | b'+' | b'@' | b'%'
                )
        });
    if safe {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// Words joined into one shell-quoted line.
pub fn shell_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The value of `key` in a rendered option list (`driver,k=v,...`), commas undoubled: for
/// tests and launchers that look into an argv.
pub fn option_value(list: &str, key: &str) -> Option<String> {
    split_options(list)
        .into_iter()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(String::from))
}

/// Splits a rendered option list at single commas (a doubled comma is part of a value).
pub fn split_options(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// A property value rendered into an option list (for tests).
pub fn render_prop(v: &PropValue) -> String {
    escape(&v.render())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::machine::{Device, Machine};
    use crate::vm::{Accel, Attachments, BootImages, NbdDisk, UserNet};

    fn snapshot() -> Machine {
        Machine::parse(
            br#"{"format":"vastream-machine-v2","machine":"pc-q35-10.0","cpu":"qemu64","vcpus":2,
            "ram_size":268435456,"memdev":"mem0","kernel_cmdline":"console=ttyS0 va.test=idle",
            "devices":[{"id":"vablk0","path":"/machine/peripheral/vablk0","driver":"vhost-user-blk-pci",
                        "props":{"num-queues":2,"addr":"0x4","chardev":"vb0","bus":"pcie.0"},"disk":"disk"},
                       {"path":"/machine/peripheral-anon/device[0]","driver":"vhost-user-blk-pci",
                        "props":{"num-queues":1,"addr":"0x5"}}]}"#,
        )
        .unwrap()
    }

    fn resume() -> Attachments {
        Attachments {
            accel: Accel::Tcg,
            blk_sockets: vec!["/run/a.sock".into(), "/run/b,c.sock".into()],
            mem_path: Some("/run/va/mem/mem".into()),
            state: Some("/run/va/state".into()),
            kernel: Some("/run/k".into()),
            initrd: Some("/run/i".into()),
            qmp: Some("/run/vm.qmp".into()),
            ..Attachments::default()
        }
    }

    /// The value after each occurrence of `flag`.
    fn values<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn resume_argv() {
        let vm = Vm::from_machine(&snapshot(), &resume()).unwrap();
        let a = vm.argv().unwrap();
        assert_eq!(values(&a, "-accel"), ["tcg"]);
        assert_eq!(values(&a, "-machine"), ["pc-q35-10.0,memory-backend=mem0"]);
        assert_eq!(values(&a, "-cpu"), ["qemu64"]);
        assert_eq!(values(&a, "-smp"), ["2"]);
        assert_eq!(
            values(&a, "-object"),
            ["memory-backend-file,id=mem0,size=268435456,mem-path=/run/va/mem/mem,share=on"]
        );
        assert_eq!(values(&a, "-kernel"), ["/run/k"]);
        assert_eq!(values(&a, "-initrd"), ["/run/i"]);
        assert_eq!(values(&a, "-append"), ["console=ttyS0 va.test=idle"]);
        assert_eq!(
            values(&a, "-chardev")[..2],
            [
                "socket,id=chr-vablk0,path=/run/a.sock,reconnect-ms=1000",
                "socket,id=chr-dev1,path=/run/b,,c.sock,reconnect-ms=1000"
            ]
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "vhost-user-blk-pci,id=vablk0,chardev=chr-vablk0,addr=0x4,bus=pcie.0,num-queues=2",
                "vhost-user-blk-pci,chardev=chr-dev1,addr=0x5,num-queues=1"
            ]
        );
        assert_eq!(values(&a, "-serial"), ["chardev:console0"]);
        assert_eq!(values(&a, "-mon"), ["chardev=qmp0,mode=control"]);
        assert!(a
            .iter()
            .any(|x| x == "socket,id=qmp0,path=/run/vm.qmp,server=on,wait=off"));
        assert_eq!(values(&a, "-incoming"), ["defer"]);
        assert_eq!(
            option_value(values(&a, "-chardev")[1], "path").as_deref(),
            Some("/run/b,c.sock")
        );
        let cmd = vm.command().unwrap();
        assert_eq!(cmd[0], QEMU);
        assert_eq!(&cmd[1..], &a[..]);
    }

    #[test]
    fn cold_boot_argv() {
        let m = Machine::cold_boot(1 << 30, 1, Some("console=ttyS0 root=/dev/vda rw".into()));
        let a = Attachments {
            blk_sockets: vec!["/run/vablk.sock".into()],
            reconnect_ms: 0,
            kernel: Some("/var/lib/va/kernel".into()),
            images: BootImages {
                kernel: true,
                initrd: false,
            },
            console: Console::File("/var/log/va,console".into()),
            net: Some(UserNet {
                hostfwd: vec!["tcp:127.0.0.1:2222-:22".into()],
            }),
            nbd: vec![NbdDisk {
                server: NbdServer::Tcp {
                    host: "127.0.0.1".into(),
                    port: 10809,
                },
                export: "disk".into(),
                device: None,
            }],
            extra_args: vec!["-no-reboot".into()],
            ..Attachments::default()
        };
        let vm = Vm::from_machine(&m, &a).unwrap();
        let v = vm.argv().unwrap();
        assert_eq!(values(&v, "-accel"), ["kvm"]);
        assert_eq!(values(&v, "-cpu"), ["host"]);
        assert_eq!(values(&v, "-machine"), ["q35,memory-backend=mem0"]);
        assert_eq!(
            values(&v, "-object"),
            ["memory-backend-memfd,id=mem0,size=1073741824,share=on"]
        );
        assert!(values(&v, "-initrd").is_empty());
        assert!(values(&v, "-incoming").is_empty());
        assert!(values(&v, "-mon").is_empty());
        assert_eq!(
            values(&v, "-chardev"),
            [
                "socket,id=chr-vablk0,path=/run/vablk.sock",
                "file,id=console0,path=/var/log/va,,console"
            ]
        );
        assert_eq!(
            values(&v, "-blockdev"),
            ["driver=nbd,node-name=node-vanbd0,server.type=inet,server.host=127.0.0.1,server.port=10809,export=disk"]
        );
        assert_eq!(
            values(&v, "-netdev"),
            ["user,id=netdev-net0,hostfwd=tcp:127.0.0.1:2222-:22"]
        );
        assert_eq!(
            values(&v, "-device"),
            [
                "vhost-user-blk-pci,id=vablk0,chardev=chr-vablk0,num-queues=1",
                "virtio-blk-pci,id=vanbd0,drive=node-vanbd0",
                "virtio-net-pci,id=net0,netdev=netdev-net0"
            ]
        );
        assert_eq!(v.last().map(String::as_str), Some("-no-reboot"));
        // Stdio and null consoles.
        let mut vm2 = vm.clone();
        vm2.console = Console::Stdio;
        assert!(vm2
            .argv()
            .unwrap()
            .contains(&"stdio,id=console0".to_string()));
        vm2.console = Console::Null;
        assert!(vm2
            .argv()
            .unwrap()
            .contains(&"null,id=console0".to_string()));
    }

    #[test]
    fn nbd_unix_and_recorded_other_disk() {
        let mut m = snapshot();
        m.devices.truncate(1);
        m.devices.push(Device {
            id: None,
            path: "/machine/peripheral-anon/device[1]".into(),
            driver: "virtio-blk-pci".into(),
            props: BTreeMap::from([("addr".to_string(), PropValue::Str("0x6".into()))]),
            disk: None,
            other_disk: true,
        });
        let a = Attachments {
            blk_sockets: vec!["/run/a.sock".into()],
            nbd: vec![NbdDisk {
                server: NbdServer::Unix("/run/nbd.sock".into()),
                export: "data".into(),
                device: Some("/machine/peripheral-anon/device[1]".into()),
            }],
            ..resume()
        };
        let v = Vm::from_machine(&m, &a).unwrap().argv().unwrap();
        assert_eq!(
            values(&v, "-blockdev"),
            ["driver=nbd,node-name=node-dev1,server.type=unix,server.path=/run/nbd.sock,export=data"]
        );
        assert!(values(&v, "-device").contains(&"virtio-blk-pci,drive=node-dev1,addr=0x6"));
    }

    #[test]
    fn render_refuses_an_invalid_vm() {
        let mut vm = Vm::from_machine(&snapshot(), &resume()).unwrap();
        vm.vcpus = 0;
        assert_eq!(vm.argv().unwrap_err().field, "vcpus");
        assert_eq!(vm.shell_line().unwrap_err().field, "vcpus");
    }

    #[test]
    fn shell_line_quotes() {
        let vm = Vm::from_machine(&snapshot(), &resume()).unwrap();
        let line = vm.shell_line().unwrap();
        assert!(
            line.contains("-append 'console=ttyS0 va.test=idle'"),
            "{line}"
        );
        assert!(
            line.contains("-machine pc-q35-10.0,memory-backend=mem0"),
            "{line}"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote("/run/a,,b"), "/run/a,,b");
    }

    #[test]
    fn shell_line_survives_a_real_shell() {
        let mut vm = Vm::from_machine(&snapshot(), &resume()).unwrap();
        vm.kernel.as_mut().unwrap().append = Some("a 'b' \"c\" $d `e` \\f".into());
        let argv = vm.argv().unwrap();
        let line = vm.shell_line().unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("for a in {line}; do printf '%s\\0' \"$a\"; done"))
            .output()
            .unwrap();
        let words: Vec<String> = out
            .stdout
            .split(|&b| b == 0)
            .filter(|w| !w.is_empty())
            .map(|w| String::from_utf8(w.to_vec()).unwrap())
            .collect();
        assert_eq!(words, argv);
    }

    #[test]
    fn escaping() {
        assert_eq!(escape("a,b,,c"), "a,,b,,,,c");
        assert_eq!(
            split_options("file,id=c,path=/a,,b"),
            ["file", "id=c", "path=/a,b"]
        );
        assert_eq!(render_prop(&PropValue::Str("x,y".into())), "x,,y");
        assert_eq!(render_prop(&PropValue::Bool(false)), "off");
        assert_eq!(option_value("a,b=1", "c"), None);
    }
}
