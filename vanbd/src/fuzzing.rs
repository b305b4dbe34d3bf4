//! Entry point for the cargo-fuzz target (`vanbd/fuzz`) and the random-input unit test:
//! runs a whole server session (handshake + transmission) over client bytes taken from the
//! input, against an in-memory device, discarding what the server sends.

use std::io::{self, Cursor};
use std::sync::Arc;

use va_store::testing::MemDevice;

use crate::handshake::Export;
use crate::server::{Server, ServerConfig};

/// Feeds `input` to a fresh server as everything one client sends. Must never panic.
pub fn session(input: &[u8]) {
    let mut data = vec![0u8; 256 << 10];
    data[4096..8192].fill(0xaa);
    data[100_000..100_100].fill(0x55);
    // The last byte picks the export's shape, to cover the refusal paths too.
    let shape = input.last().copied().unwrap_or(0);
    let ro = shape & 1 == 1;
    let mut export = Export::new("disk", Arc::new(MemDevice::new(data, ro)));
    if shape & 2 == 2 {
        export.min_block = 512;
    }
    let cfg = ServerConfig {
        workers: 2,
        ..ServerConfig::default()
    };
    let Ok(server) = Server::new(export, cfg) else {
        return;
    };
    let _ = server.serve_stream(
        Cursor::new(input),
        Box::new(io::sink()),
        &|| {},
        Box::new(|| {}),
    );
}

/// A valid client prefix (fixed newstyle, structured replies, base:allocation, GO) after
/// which transmission requests follow; fuzzers and tests build inputs from it.
pub fn valid_prefix() -> Vec<u8> {
    use crate::proto::*;
    let mut v = Vec::new();
    v.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    let mut opt = |code: u32, data: &[u8]| {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    };
    opt(OPT_STRUCTURED_REPLY, &[]);
    let mut meta = 0u32.to_be_bytes().to_vec();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    meta.extend_from_slice(BASE_ALLOCATION);
    opt(OPT_SET_META_CONTEXT, &meta);
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    opt(OPT_GO, &go);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;
    use rand::{Rng, SeedableRng};

    /// Property-style test over random client byte streams: fully random, random options after
    /// valid flags, and random (but well-framed, mostly) requests after a valid handshake.
    #[test]
    fn random_sessions_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e6264);
        let cmds = [
            CMD_READ,
            CMD_WRITE,
            CMD_FLUSH,
            CMD_TRIM,
            CMD_CACHE,
            CMD_WRITE_ZEROES,
            CMD_BLOCK_STATUS,
            CMD_DISC,
            9,
        ];
        for i in 0..3000 {
            let mut input: Vec<u8> = Vec::new();
            match i % 3 {
                0 => input.extend((0..rng.gen_range(0..200)).map(|_| rng.gen::<u8>())),
                1 => {
                    input.extend_from_slice(&1u32.to_be_bytes());
                    for _ in 0..rng.gen_range(1..6) {
                        input.extend_from_slice(&IHAVEOPT.to_be_bytes());
                        input.extend_from_slice(&rng.gen_range(0u32..12).to_be_bytes());
                        let n = rng.gen_range(0..40);
                        input.extend_from_slice(&(n as u32).to_be_bytes());
                        input.extend((0..n).map(|_| rng.gen_range(0u8..5)));
                    }
                }
                _ => {
                    input = valid_prefix();
                    for _ in 0..rng.gen_range(1..20) {
                        let cmd = cmds[rng.gen_range(0..cmds.len())];
                        let len: u32 = if rng.gen_bool(0.9) {
                            rng.gen_range(0..20_000)
                        } else {
                            rng.gen()
                        };
                        let off: u64 = if rng.gen_bool(0.9) {
                            rng.gen_range(0..300_000)
                        } else {
                            rng.gen()
                        };
                        let magic = if rng.gen_bool(0.97) {
                            REQUEST_MAGIC
                        } else {
                            rng.gen()
                        };
                        input.extend_from_slice(&magic.to_be_bytes());
                        input.extend_from_slice(&rng.gen_range(0u16..64).to_be_bytes());
                        input.extend_from_slice(&cmd.to_be_bytes());
                        input.extend_from_slice(&rng.gen::<u64>().to_be_bytes());
                        input.extend_from_slice(&off.to_be_bytes());
                        input.extend_from_slice(&len.to_be_bytes());
                        if cmd == CMD_WRITE && len < 20_000 {
                            input.extend((0..len).map(|_| rng.gen::<u8>()));
                        }
                    }
                }
            }
            session(&input);
        }
    }
}
