//! Test disk images (random, sparse, with zero and repeated chunks) and sha256 helpers.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use rand::{Rng, SeedableRng};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Writes a disk of `mib` MiB of random data. With `zero_runs`, every fifth 64 KiB chunk is
/// left zero (like a real disk; those chunks pack as zero chunks); without, every byte is
/// random. The data depends only on the arguments. Returns its sha256 (see [`sha256_file`]).
pub fn random_disk(path: &Path, mib: usize, zero_runs: bool) -> String {
    const CHUNK: usize = 64 << 10;
    let seed = if zero_runs {
        mib as u64 * 7919
    } else {
        mib as u64
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let mut w = std::io::BufWriter::new(f);
    let mut chunk = vec![0u8; CHUNK];
    for i in 0..(mib << 20) / CHUNK {
        if zero_runs && i % 5 == 3 {
            chunk.fill(0);
        } else {
            rng.fill(&mut chunk[..]);
        }
        w.write_all(&chunk).expect("writing a random disk");
    }
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .expect("writing a random disk");
    sha256_file(path)
}

/// Writes a test image: random data, zero runs and repeated chunks (64 KiB grain), `mib` MiB:
/// of every 7 chunks, 3 random, 1 zero, 1 a copy of chunk 0, 1 compressible, 1 all zero but
/// one byte (the same in each). Returns the data.
pub fn make_image(path: &Path, mib: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cs = 64 << 10;
    let mut v = vec![0u8; mib << 20];
    let n = v.len() / cs;
    for c in 0..n {
        match c % 7 {
            0..=2 => rng.fill(&mut v[c * cs..(c + 1) * cs]),
            3 => {}
            4 => v.copy_within(0..cs, c * cs),
            5 => {
                for (i, b) in v[c * cs..(c + 1) * cs].iter_mut().enumerate() {
                    *b = (i / 512) as u8 ^ c as u8; // compressible
                }
            }
            _ => v[c * cs + 100] = 1,
        }
    }
    std::fs::write(path, &v).expect("write image");
    v
}

/// A sparse test image of 16 MiB: random data in `[0,1M)`, `[3M,3.5M)`, `[8M,8M+4K)` and
/// `[12M,13M)` (that last run is written zero bytes: allocated, reads as zeros), holes
/// elsewhere. Returns the data runs (offset, len) as the file system reports them.
pub fn sparse_image(path: &Path) -> Vec<(u64, u64)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let f = std::fs::File::create(path).expect("creating the sparse image");
    f.set_len(16 * MIB).expect("sizing the sparse image");
    let runs = [
        (0, MIB),
        (3 * MIB, MIB / 2),
        (8 * MIB, 4096),
        (12 * MIB, MIB),
    ];
    for &(o, l) in &runs {
        let mut d = vec![0u8; l as usize];
        if o != 12 * MIB {
            rng.fill(&mut d[..]);
        }
        f.write_all_at(&d, o).expect("writing the sparse image");
    }
    f.sync_all().expect("syncing the sparse image");
    runs.to_vec()
}

/// Total size of the regular files under `dir`.
pub fn du(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => total += du(&p),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// Lower-case hex SHA-256 of bytes, computed by the host's `sha256sum` (to stay independent
/// of our own hashing code).
pub fn sha256(data: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running sha256sum");
    let mut stdin = c.stdin.take().expect("piped stdin");
    let d = data.to_vec();
    let t = std::thread::spawn(move || stdin.write_all(&d));
    let out = c.wait_with_output().expect("sha256sum output");
    t.join()
        .expect("writer thread")
        .expect("writing to sha256sum");
    hex_of(&out)
}

/// Lower-case hex SHA-256 of a file, computed by the host's `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("running sha256sum");
    hex_of(&out)
}

/// Lower-case hex SHA-256 of `len` bytes of a file at `offset`.
pub fn sha256_range(path: &Path, offset: u64, len: u64) -> String {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reading {len} bytes at {offset} of {}: {e}", path.display()));
    sha256(&buf)
}

fn hex_of(out: &std::process::Output) -> String {
    assert!(out.status.success(), "sha256sum failed ({})", out.status);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a hash printed by sha256sum")
        .to_string()
}
