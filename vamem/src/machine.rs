//! The few facts vamem reads from a QEMU device-state stream, and the check that a bundle's
//! RAM image, machine description and device state belong together, before QEMU is started.
//! The machine description itself (`machine.json`) is [`qemu_args::Machine`], documented in
//! `qemu-args/src/machine.rs`.
//!
//! # Device state
//!
//! `migrate file:` with `x-ignore-shared` writes a stream that starts
//! `"QEVM" u32be(3)`, then a configuration section (`0x07`, u32be length, machine type, and
//! subsections such as `configuration/capabilities`), then the RAM setup section (`0x01`,
//! section id, `"ram"`, instance, version, u64be total size | 0x04, then one
//! `{u8 len, id, u64be used_length [, u64be address if x-ignore-shared]}` per RAM block).
//! [`parse_state`] decodes exactly that prefix, untrusted, and nothing else.

pub use qemu_args::Machine;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The machine description does not decode.
    #[error(transparent)]
    Description(#[from] qemu_args::MachineError),
    #[error("device state: {0}")]
    State(String),
    /// The stream uses a layout this parser does not know (not necessarily wrong).
    #[error("device state: {0} (cannot check it against the RAM image)")]
    Unsupported(String),
    #[error("{0}")]
    Mismatch(String),
}

/// What the start of a device-state stream says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateInfo {
    /// Machine type from the configuration section (e.g. `pc-q35-10.0`).
    pub machine: Option<String>,
    /// Migration capabilities recorded in the stream (e.g. `x-ignore-shared`).
    pub capabilities: Vec<String>,
    /// RAM blocks: id and used length.
    pub ram_blocks: Vec<(String, u64)>,
}

const MAX_BLOCKS: usize = 4096;

struct Rd<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MachineError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        match end {
            Some(e) => {
                let s = &self.b[self.pos..e];
                self.pos = e;
                Ok(s)
            }
            None => Err(MachineError::State(format!(
                "truncated at byte {} (wanted {n} more)",
                self.pos
            ))),
        }
    }
    fn u8(&mut self) -> Result<u8, MachineError> {
        Ok(self.take(1)?[0])
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }
    fn u32(&mut self) -> Result<u32, MachineError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, MachineError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    fn str(&mut self, n: usize) -> Result<String, MachineError> {
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| MachineError::State(format!("non-UTF-8 name at byte {}", self.pos)))
    }
}

const VM_SECTION_START: u8 = 0x01;
const VM_SUBSECTION: u8 = 0x05;
const VM_CONFIGURATION: u8 = 0x07;
const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;

/// Decodes the header, configuration and RAM setup section of a QEMU device-state stream.
/// `bytes` may be just the first few KiB of the stream.
pub fn parse_state(bytes: &[u8]) -> Result<StateInfo, MachineError> {
    let mut r = Rd { b: bytes, pos: 0 };
    if r.take(4)? != b"QEVM" {
        return Err(MachineError::State(
            "not a QEMU migration stream (no QEVM magic)".into(),
        ));
    }
    let v = r.u32()?;
    if v != 3 {
        return Err(MachineError::Unsupported(format!("stream version {v}")));
    }
    let mut info = StateInfo::default();
    if r.peek() == Some(VM_CONFIGURATION) {
        r.u8()?;
        let n = r.u32()? as usize;
        if n > 256 {
            return Err(MachineError::State(format!("machine name of {n} bytes")));
        }
        info.machine = Some(r.str(n)?);
        while r.peek() == Some(VM_SUBSECTION) {
            r.u8()?;
            let n = r.u8()? as usize;
            let name = r.str(n)?;
            let _version = r.u32()?;
            match name.as_str() {
                "configuration/capabilities" => {
                    let count = r.u32()? as usize;
                    if count > 256 {
                        return Err(MachineError::State(format!("{count} capabilities")));
                    }
                    for _ in 0..count {
                        let n = r.u8()? as usize;
                        info.capabilities.push(r.str(n)?);
                    }
                }
                other => {
                    return Err(MachineError::Unsupported(format!(
                        "configuration subsection {other:?}"
                    )))
                }
            }
        }
    }
    if info.capabilities.iter().any(|c| c == "mapped-ram") {
        return Err(MachineError::Unsupported("mapped-ram stream".into()));
    }
    if info.capabilities.iter().any(|c| c == "postcopy-ram") {
        return Err(MachineError::Unsupported("postcopy-ram stream".into()));
    }
    let ignore_shared = info.capabilities.iter().any(|c| c == "x-ignore-shared");
    let t = r.u8()?;
    if t != VM_SECTION_START {
        return Err(MachineError::Unsupported(format!(
            "first section type {t:#x}, expected a section start"
        )));
    }
    let _section_id = r.u32()?;
    let n = r.u8()? as usize;
    let id = r.str(n)?;
    if id != "ram" {
        return Err(MachineError::Unsupported(format!(
            "first section is {id:?}, not ram"
        )));
    }
    let _instance = r.u32()?;
    let _version = r.u32()?;
    let head = r.u64()?;
    if head & RAM_SAVE_FLAG_MEM_SIZE == 0 {
        return Err(MachineError::State(
            "RAM section without a size record".into(),
        ));
    }
    let total = head & !0xfff;
    let mut sum = 0u64;
    while sum < total {
        if info.ram_blocks.len() >= MAX_BLOCKS {
            return Err(MachineError::State("too many RAM blocks".into()));
        }
        let n = r.u8()? as usize;
        let id = r.str(n)?;
        let len = r.u64()?;
        if ignore_shared {
            let _addr = r.u64()?;
        }
        sum = sum
            .checked_add(len)
            .ok_or_else(|| MachineError::State("RAM block sizes overflow".into()))?;
        info.ram_blocks.push((id, len));
    }
    if sum != total {
        return Err(MachineError::State(format!(
            "RAM blocks add up to {sum} bytes, the header says {total}"
        )));
    }
    Ok(info)
}

/// Checks that a mem image of `mem_size` bytes, a machine description and a device-state
/// prefix belong together. Returns warnings for what could not be checked.
pub fn check_bundle(
    mem_size: u64,
    machine: Option<&[u8]>,
    state: Option<&[u8]>,
) -> Result<Vec<String>, MachineError> {
    let mut warnings = Vec::new();
    let m = match machine {
        Some(b) => {
            let m = Machine::parse(b)?;
            if m.ram_size != mem_size {
                return Err(MachineError::Mismatch(format!(
                    "the machine description says {} bytes of RAM, the mem image has {mem_size}",
                    m.ram_size
                )));
            }
            Some(m)
        }
        None => {
            warnings.push("the appliance has no machine description".into());
            None
        }
    };
    let Some(state) = state else {
        warnings.push("the appliance has no device state".into());
        return Ok(warnings);
    };
    let info = match parse_state(state) {
        Ok(i) => i,
        Err(MachineError::Unsupported(e)) => {
            warnings.push(format!("device state not checked: {e}"));
            return Ok(warnings);
        }
        Err(e) => return Err(e),
    };
    if !info.capabilities.iter().any(|c| c == "x-ignore-shared") {
        return Err(MachineError::Mismatch(
            "the device state was saved without x-ignore-shared: it carries its own RAM, and \
             QEMU would not take RAM from the mem image"
                .into(),
        ));
    }
    let memdev = m
        .as_ref()
        .map(|m| m.memdev().to_string())
        .unwrap_or_else(|| qemu_args::machine::DEFAULT_MEMDEV.into());
    match info.ram_blocks.iter().find(|(id, _)| *id == memdev) {
        Some((_, len)) if *len != mem_size => {
            return Err(MachineError::Mismatch(format!(
                "the device state's RAM block {memdev:?} has {len} bytes, the mem image has \
                 {mem_size}"
            )))
        }
        Some(_) => {}
        None => warnings.push(format!(
            "the device state has no RAM block {memdev:?} (blocks: {})",
            info.ram_blocks
                .iter()
                .map(|(i, _)| i.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
    if let (Some(m), Some(sm)) = (&m, &info.machine) {
        if m.machine != *sm {
            return Err(MachineError::Mismatch(format!(
                "the machine description says machine {:?}, the device state was saved on {sm:?}",
                m.machine
            )));
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream prefix laid out like QEMU 10 writes it.
    fn stream(machine: &str, caps: &[&str], blocks: &[(&str, u64)]) -> Vec<u8> {
        let mut v = b"QEVM".to_vec();
        v.extend(3u32.to_be_bytes());
        v.push(0x07);
        v.extend((machine.len() as u32).to_be_bytes());
        v.extend(machine.as_bytes());
        v.push(0x05);
        let sub = "configuration/capabilities";
        v.push(sub.len() as u8);
        v.extend(sub.as_bytes());
        v.extend(1u32.to_be_bytes());
        v.extend((caps.len() as u32).to_be_bytes());
        for c in caps {
            v.push(c.len() as u8);
            v.extend(c.as_bytes());
        }
        v.push(0x01);
        v.extend(1u32.to_be_bytes());
        v.push(3);
        v.extend(b"ram");
        v.extend(0u32.to_be_bytes());
        v.extend(4u32.to_be_bytes());
        let total: u64 = blocks.iter().map(|b| b.1).sum();
        v.extend((total | 4).to_be_bytes());
        for (id, len) in blocks {
            v.push(id.len() as u8);
            v.extend(id.as_bytes());
            v.extend(len.to_be_bytes());
            if caps.contains(&"x-ignore-shared") {
                v.extend(0u64.to_be_bytes());
            }
        }
        v.extend([0u8; 16]); // whatever follows
        v
    }

    fn machine(ram: u64, ty: &str) -> Vec<u8> {
        format!(
            r#"{{"format":"{}","machine":"{ty}","ram_size":{ram},"memdev":"mem0","extra":1}}"#,
            qemu_args::machine::FORMAT_V2
        )
        .into_bytes()
    }

    #[test]
    fn parses_a_qemu_stream_prefix() {
        let s = stream(
            "pc-q35-10.0",
            &["x-ignore-shared"],
            &[("mem0", 256 << 20), ("pc.bios", 0x40000)],
        );
        let i = parse_state(&s).unwrap();
        assert_eq!(i.machine.as_deref(), Some("pc-q35-10.0"));
        assert_eq!(i.capabilities, vec!["x-ignore-shared".to_string()]);
        assert_eq!(
            i.ram_blocks,
            vec![("mem0".into(), 256 << 20), ("pc.bios".into(), 0x40000)]
        );
        // Every truncation is an error, never a panic.
        for n in 0..s.len() - 16 {
            assert!(
                parse_state(&s[..n]).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
        assert!(matches!(
            parse_state(b"QEVX\0\0\0\x03"),
            Err(MachineError::State(_))
        ));
    }

    #[test]
    fn bundle_check_catches_mismatches() {
        let mem = 256u64 << 20;
        let good = stream("pc-q35-10.0", &["x-ignore-shared"], &[("mem0", mem)]);
        let w = check_bundle(mem, Some(&machine(mem, "pc-q35-10.0")), Some(&good)).unwrap();
        assert!(w.is_empty(), "{w:?}");
        // A description written before v2 is still read.
        let v1 = format!(
            r#"{{"format":"{}","machine":"pc-q35-10.0","ram_size":{mem},"devices":[{{"path":"/machine/peripheral-anon/device[0]","type":"virtio-blk-pci"}}]}}"#,
            qemu_args::machine::FORMAT_V1
        );
        assert!(check_bundle(mem, Some(v1.as_bytes()), Some(&good))
            .unwrap()
            .is_empty());
        let e = check_bundle(
            mem,
            Some(br#"{"format":"vastream-machine-v2","machine":"q35"}"#),
            None,
        );
        assert!(
            matches!(e, Err(MachineError::Description(ref d)) if d.to_string().contains("ram_size")),
            "{e:?}"
        );
        let e = check_bundle(mem * 2, Some(&machine(mem, "pc-q35-10.0")), Some(&good));
        assert!(
            matches!(e, Err(MachineError::Mismatch(ref m)) if m.contains("machine description says"))
        );
        let e = check_bundle(mem, Some(&machine(mem, "pc-i440fx-10.0")), Some(&good));
        assert!(matches!(e, Err(MachineError::Mismatch(ref m)) if m.contains("pc-i440fx")));
        let small = stream("pc-q35-10.0", &["x-ignore-shared"], &[("mem0", mem / 2)]);
        let e = check_bundle(mem, None, Some(&small));
        assert!(matches!(e, Err(MachineError::Mismatch(ref m)) if m.contains("RAM block")));
        let noignore = stream("pc-q35-10.0", &[], &[("mem0", mem)]);
        assert!(matches!(
            check_bundle(mem, None, Some(&noignore)),
            Err(MachineError::Mismatch(_))
        ));
        assert!(check_bundle(mem, Some(b"{not json"), None).is_err());
        assert_eq!(check_bundle(mem, None, None).unwrap().len(), 2);
    }
}
