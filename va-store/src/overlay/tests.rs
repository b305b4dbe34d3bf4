use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

const B: u64 = OVERLAY_BLOCK;
const ID: &str = "0123abcd/disk";

/// Content of block `blk` as written by operation `tag`: never all zeros, unique per (tag, blk).
fn block(tag: u64, blk: u64) -> Vec<u8> {
    let mut v = vec![(tag.wrapping_mul(31).wrapping_add(blk) as u8) | 1; B as usize];
    v[..8].copy_from_slice(&tag.to_le_bytes());
    v[8..16].copy_from_slice(&blk.to_le_bytes());
    v
}

fn blocks(tag: u64, start: u64, n: u64) -> Vec<u8> {
    (start..start + n).flat_map(|b| block(tag, b)).collect()
}

fn read_block(ov: &Overlay, blk: u64) -> Vec<u8> {
    let mut buf = vec![0u8; B as usize];
    ov.read(blk * B, &mut buf).unwrap();
    buf
}

fn state(ov: &Overlay, blk: u64) -> BlockState {
    let m = ov.map(blk * B, B);
    assert_eq!(m.len(), 1);
    m[0].2
}

/// Drops the overlay the way a crash would: without the final flush.
fn crash(ov: Overlay) {
    ov.flush_on_drop.store(false, Ordering::Relaxed);
    drop(ov);
}

fn map_len(path: &Path) -> u64 {
    fs::metadata(sibling(path, ".map")).unwrap().len()
}

#[test]
fn write_read_zero_map() {
    use BlockState::*;
    let dir = tempfile::tempdir().unwrap();
    let ov = Overlay::open(&dir.path().join("ov"), 64 * B, ID).unwrap();
    assert_eq!(ov.map(0, 64 * B), vec![(0, 64 * B, Base)]);
    ov.write(4 * B, &blocks(1, 4, 2)).unwrap();
    ov.zero(10 * B, 3 * B).unwrap();
    assert_eq!(
        ov.map(100, 20 * B - 100),
        vec![
            (100, 4 * B - 100, Base),
            (4 * B, 2 * B, Data),
            (6 * B, 4 * B, Base),
            (10 * B, 3 * B, Zero),
            (13 * B, 7 * B, Base),
        ]
    );
    assert_eq!(read_block(&ov, 5), block(1, 5));
    let mut part = vec![0u8; 100];
    ov.read(4 * B + 10, &mut part).unwrap();
    assert_eq!(part, block(1, 4)[10..110]);
    // Zero over data: the data file no longer holds it.
    ov.zero(5 * B, B).unwrap();
    assert_eq!(state(&ov, 4), Data);
    assert_eq!(state(&ov, 5), Zero);
    assert!(read_block(&ov, 5).iter().all(|&b| b == 0));
    // Data over zero.
    ov.write(11 * B, &block(2, 11)).unwrap();
    assert_eq!(
        ov.map(9 * B, 5 * B),
        vec![
            (9 * B, B, Base),
            (10 * B, B, Zero),
            (11 * B, B, Data),
            (12 * B, B, Zero),
            (13 * B, B, Base)
        ]
    );
    let s = ov.stats();
    assert_eq!(
        (s.data_blocks, s.zero_blocks, s.bytes_written),
        (2, 3, 3 * B)
    );
    // Clipping.
    assert_eq!(ov.map(64 * B, 10), vec![]);
    assert_eq!(ov.map(60 * B, 100 * B), vec![(60 * B, 4 * B, Base)]);
    assert_eq!(ov.map(0, 0), vec![]);
    // Refusals.
    for e in [
        ov.write(100, &block(3, 0)).unwrap_err(),
        ov.write(0, &[0u8; 100]).unwrap_err(),
        ov.write(64 * B, &block(3, 64)).unwrap_err(),
        ov.write(u64::MAX - B + 1, &block(3, 0)).unwrap_err(),
        ov.zero(B, 10).unwrap_err(),
        ov.zero(60 * B, 8 * B).unwrap_err(),
        ov.read(63 * B + 1, &mut [0u8; 4096]).unwrap_err(),
    ] {
        assert!(matches!(e, OverlayError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("ov"), "{e}");
    }
    assert_eq!(ov.stats().bytes_written, 3 * B);
    ov.write(0, &[]).unwrap();
    ov.zero(0, 0).unwrap();
}

#[test]
fn image_size_not_a_multiple_of_the_block() {
    let dir = tempfile::tempdir().unwrap();
    let ov = Overlay::open(&dir.path().join("ov"), 10_000, ID).unwrap();
    ov.write(2 * B, &block(1, 2)).unwrap();
    assert_eq!(
        ov.map(0, 20_000),
        vec![
            (0, 2 * B, BlockState::Base),
            (2 * B, 10_000 - 2 * B, BlockState::Data)
        ]
    );
    assert!(ov.write(3 * B, &block(1, 3)).is_err());
    assert_eq!(fs::metadata(dir.path().join("ov")).unwrap().len(), 3 * B);
}

#[test]
fn reopen_keeps_flushed_writes() {
    use BlockState::*;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ov");
    let ov = Overlay::open(&p, 64 * B, ID).unwrap();
    ov.write(B, &block(1, 1)).unwrap();
    ov.zero(20 * B, 4 * B).unwrap();
    ov.flush().unwrap();
    ov.write(2 * B, &block(2, 2)).unwrap();
    ov.zero(B, B).unwrap(); // unflushed zeroing of a flushed block
    crash(ov);

    let ov = Overlay::open(&p, 64 * B, ID).unwrap();
    assert_eq!(state(&ov, 20), Zero);
    assert_eq!(state(&ov, 23), Zero);
    // Unflushed: this implementation records map changes only on flush.
    assert_eq!(state(&ov, 2), Base);
    // Block 1: either the flushed data or the (unflushed) zeroing; never anything else.
    match state(&ov, 1) {
        Data => {
            let got = read_block(&ov, 1);
            assert!(got == block(1, 1) || got.iter().all(|&b| b == 0));
        }
        Zero => {}
        Base => panic!("flushed write lost"),
    }
    ov.write(3 * B, &block(3, 3)).unwrap();
    drop(ov); // a clean drop flushes

    let ov = Overlay::open(&p, 64 * B, ID).unwrap();
    assert_eq!(state(&ov, 3), Data);
    assert_eq!(read_block(&ov, 3), block(3, 3));
    let s = ov.stats();
    assert_eq!(s.zero_blocks, 4 + u64::from(state(&ov, 1) == Zero));
    assert_eq!(s.bytes_written, 0);
}

#[test]
fn second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ov");
    let ov = Overlay::open(&p, 64 * B, ID).unwrap();
    let err = Overlay::open(&p, 64 * B, ID).err().unwrap();
    let me = std::process::id();
    assert!(matches!(err, OverlayError::Locked { pid: Some(pid), .. } if pid == me));
    let msg = err.to_string();
    assert!(
        msg.contains(&p.display().to_string()) && msg.contains(&me.to_string()),
        "{msg}"
    );
    drop(ov);
    Overlay::open(&p, 64 * B, ID).unwrap();
}

/// Spawns this test binary running the ignored helper test `name` with `envs`.
fn spawn_helper(name: &str, envs: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

#[test]
#[ignore = "helper process of second_writer_process_is_refused"]
fn lock_holder_child() {
    let Ok(p) = std::env::var("VA_OVERLAY_LOCK_PATH") else {
        return;
    };
    let _ov = Overlay::open(Path::new(&p), 64 * B, ID).unwrap();
    println!("LOCKED");
    thread::sleep(Duration::from_secs(60));
}

#[test]
fn second_writer_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ov");
    let mut child = spawn_helper(
        "overlay::tests::lock_holder_child",
        &[("VA_OVERLAY_LOCK_PATH", p.display().to_string())],
    );
    let out = BufReader::new(child.stdout.take().unwrap());
    // libtest may print "test <name> ... " on the same line before the helper's output.
    let locked = out
        .lines()
        .map_while(Result::ok)
        .any(|l| l.ends_with("LOCKED"));
    assert!(locked, "helper did not take the lock");
    let err = Overlay::open(&p, 64 * B, ID).err().unwrap();
    assert!(
        matches!(err, OverlayError::Locked { pid: Some(pid), .. } if pid == child.id()),
        "{err}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    Overlay::open(&p, 64 * B, ID).unwrap();
}

#[test]
fn other_identity_or_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ov");
    let ov = Overlay::open(&p, 64 * B, ID).unwrap();
    ov.write(0, &block(1, 0)).unwrap();
    drop(ov);
    let err = Overlay::open(&p, 64 * B, "ffff/disk").err().unwrap();
    assert!(matches!(err, OverlayError::Mismatch { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(ID) && msg.contains("ffff/disk") && msg.contains("ov"),
        "{msg}"
    );
    let err = Overlay::open(&p, 65 * B, ID).err().unwrap();
    assert!(matches!(err, OverlayError::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains(&(64 * B).to_string()));
    // Nothing was changed by the refused opens.
    let ov = Overlay::open(&p, 64 * B, ID).unwrap();
    assert_eq!(read_block(&ov, 0), block(1, 0));
    assert_eq!(fs::metadata(&p).unwrap().len(), 64 * B);
    let long = "x".repeat(MAX_IDENTITY + 1);
    assert!(matches!(
        Overlay::open(&dir.path().join("o2"), B, &long),
        Err(OverlayError::Invalid { .. })
    ));
    assert!(matches!(
        Overlay::open(&dir.path().join("o3"), MAX_IMAGE_SIZE + 1, ID),
        Err(OverlayError::Invalid { .. })
    ));
}

/// An overlay whose map holds three journal records (blocks 0, 1, 2 written, one per flush).
fn three_records(p: &Path) -> u64 {
    let ov = Overlay::open(p, 64 * B, ID).unwrap();
    for b in 0..3 {
        ov.write(b * B, &block(b + 1, b)).unwrap();
        ov.flush().unwrap();
    }
    crash(ov);
    let len = map_len(p);
    assert_eq!(len, header_len(ID.len()) as u64 + 3 * RECORD as u64);
    len
}

fn data_blocks(ov: &Overlay) -> Vec<u64> {
    (0..64)
        .filter(|&b| state(ov, b) == BlockState::Data)
        .collect()
}

#[test]
fn torn_map_tail_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    type Damage = fn(&Path, u64);
    let cases: [(&str, Damage); 4] = [
        ("truncated record", |m, len| {
            File::options()
                .write(true)
                .open(m)
                .unwrap()
                .set_len(len - 10)
                .unwrap();
        }),
        ("flipped byte", |m, len| {
            let f = File::options().read(true).write(true).open(m).unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, len - 29).unwrap();
            f.write_all_at(&[b[0] ^ 0x40], len - 29).unwrap();
        }),
        ("zeroed record", |m, len| {
            File::options()
                .write(true)
                .open(m)
                .unwrap()
                .write_all_at(&[0u8; 32], len - 32)
                .unwrap();
        }),
        ("record from another generation", |m, len| {
            let rec = encode_record(7, 2, 1, BlockState::Data);
            File::options()
                .write(true)
                .open(m)
                .unwrap()
                .write_all_at(&rec, len - 32)
                .unwrap();
        }),
    ];
    for (i, (what, damage)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("ov{i}"));
        let len = three_records(&p);
        damage(&sibling(&p, ".map"), len);
        let ov = Overlay::open(&p, 64 * B, ID).unwrap();
        assert_eq!(data_blocks(&ov), vec![0, 1], "{what}");
        assert_eq!(read_block(&ov, 1), block(2, 1));
        // The torn tail was cut off: new records land where replay finds them.
        assert_eq!(map_len(&p), len - 32, "{what}");
        ov.write(5 * B, &block(9, 5)).unwrap();
        ov.flush().unwrap();
        crash(ov);
        let ov = Overlay::open(&p, 64 * B, ID).unwrap();
        assert_eq!(data_blocks(&ov), vec![0, 1, 5], "{what}");
    }
}

#[test]
fn trailing_garbage_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ov");
    let len = three_records(&p);
    let f = File::options()
        .write(true)
        .open(sibling(&p, ".map"))
        .unwrap();
    f.write_all_at(&[0xa5; 20], len).unwrap();
    let ov = Overlay::open(&p, 64 * B, ID).unwrap();
    assert_eq!(data_blocks(&ov), vec![0, 1, 2]);
    assert_eq!(map_len(&p), len);
}

#[test]
fn damaged_header_or_snapshot_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let flip = |m: &Path, at: u64| {
        let f = File::options().read(true).write(true).open(m).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 1], at).unwrap();
    };
    // Header: identity byte flipped.
    let p = dir.path().join("a");
    three_records(&p);
    flip(&sibling(&p, ".map"), 50);
    let err = Overlay::open(&p, 64 * B, ID).err().unwrap();
    assert!(matches!(err, OverlayError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("a.map"), "{err}");
    // Snapshot record damaged.
    let p = dir.path().join("b");
    three_records(&p);
    Overlay::open(&p, 64 * B, ID).unwrap().compact().unwrap();
    assert_eq!(map_len(&p), header_len(ID.len()) as u64 + 32);
    flip(&sibling(&p, ".map"), header_len(ID.len()) as u64 + 3);
    let err = Overlay::open(&p, 64 * B, ID).err().unwrap();
    assert!(matches!(err, OverlayError::Corrupt { .. }), "{err}");
    // Unknown version.
    let p = dir.path().join("c");
    three_records(&p);
    File::options()
        .write(true)
        .open(sibling(&p, ".map"))
        .unwrap()
        .write_all_at(&2u32.to_le_bytes(), 8)
        .unwrap();
    let err = Overlay::open(&p, 64 * B, ID).err().unwrap();
    assert!(
        matches!(err, OverlayError::UnknownVersion { version: 2, .. }),
        "{err}"
    );
    // Not a map at all / truncated header.
    let p = dir.path().join("d");
    three_records(&p);
    fs::write(sibling(&p, ".map"), b"hello").unwrap();
    assert!(matches!(
        Overlay::open(&p, 64 * B, ID),
        Err(OverlayError::Corrupt { .. })
    ));
    // Data without its map.
    let p = dir.path().join("e");
    three_records(&p);
    fs::remove_file(sibling(&p, ".map")).unwrap();
    let err = Overlay::open(&p, 64 * B, ID).err().unwrap();
    assert!(matches!(err, OverlayError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn journal_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ov");
    let blocks_n = 1000u64;
    let ov = Overlay::open(&p, blocks_n * B, ID).unwrap();
    ov.compact_min.store(8, Ordering::Relaxed);
    let mut latest = vec![None; blocks_n as usize];
    let h = header_len(ID.len()) as u64;
    for i in 0..300u64 {
        let b = (i * 37) % blocks_n;
        if i % 5 == 4 {
            ov.zero(b * B, B).unwrap();
            latest[b as usize] = Some(None);
        } else {
            ov.write(b * B, &block(i, b)).unwrap();
            latest[b as usize] = Some(Some(i));
        }
        ov.flush().unwrap();
        // The map file stays within a small multiple of the map itself.
        let extents = ov
            .map(0, blocks_n * B)
            .iter()
            .filter(|r| r.2 != BlockState::Base)
            .count() as u64;
        assert!(
            map_len(&p) <= h + 32 * (2 * extents.max(8) + 2),
            "after {i}"
        );
    }
    assert!(ov.stats().compactions >= 3);
    let check = |ov: &Overlay| {
        for (b, l) in latest.iter().enumerate() {
            let b = b as u64;
            match l {
                None => assert_eq!(state(ov, b), BlockState::Base),
                Some(None) => assert_eq!(state(ov, b), BlockState::Zero),
                Some(Some(i)) => assert_eq!(read_block(ov, b), block(*i, b)),
            }
        }
    };
    check(&ov);
    crash(ov);
    let ov = Overlay::open(&p, blocks_n * B, ID).unwrap();
    check(&ov);
    ov.compact().unwrap();
    let extents = ov
        .map(0, blocks_n * B)
        .iter()
        .filter(|r| r.2 != BlockState::Base)
        .count() as u64;
    assert_eq!(map_len(&p), h + 32 * extents);
    crash(ov);
    let ov = Overlay::open(&p, blocks_n * B, ID).unwrap();
    check(&ov);
    assert!(!sibling(&p, ".map.tmp").exists());
}

#[test]
fn concurrent_writers_readers_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ov");
    let per = 256u64;
    let ov = Overlay::open(&p, 4 * per * B, ID).unwrap();
    ov.compact_min.store(64, Ordering::Relaxed);
    let done = AtomicBool::new(false);
    let finals: Vec<Vec<Option<Option<u64>>>> = thread::scope(|s| {
        let flusher = s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                ov.flush().unwrap();
            }
        });
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let ov = &ov;
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t);
                    let mut latest = vec![None; per as usize];
                    for i in 0..600u64 {
                        let k = rng.gen_range(0..per - 3);
                        let n = rng.gen_range(1..=3u64);
                        let b = t * per + k;
                        let tag = t << 32 | i;
                        if rng.gen_bool(0.2) {
                            ov.zero(b * B, n * B).unwrap();
                            for x in k..k + n {
                                latest[x as usize] = Some(None);
                            }
                            assert_eq!(
                                ov.map(b * B, n * B),
                                vec![(b * B, n * B, BlockState::Zero)]
                            );
                        } else {
                            ov.write(b * B, &blocks(tag, b, n)).unwrap();
                            for x in k..k + n {
                                latest[x as usize] = Some(Some(tag));
                            }
                            let mut got = vec![0u8; (n * B) as usize];
                            ov.read(b * B, &mut got).unwrap();
                            assert_eq!(got, blocks(tag, b, n));
                        }
                    }
                    latest
                })
            })
            .collect();
        let finals = workers.into_iter().map(|w| w.join().unwrap()).collect();
        done.store(true, Ordering::Relaxed);
        flusher.join().unwrap();
        finals
    });
    ov.flush().unwrap();
    let flushes = ov.stats().flushes;
    assert!(flushes > 1);
    crash(ov);
    let ov = Overlay::open(&p, 4 * per * B, ID).unwrap();
    let mut data = 0;
    for (t, latest) in finals.iter().enumerate() {
        for (k, l) in latest.iter().enumerate() {
            let b = t as u64 * per + k as u64;
            match l {
                None => assert_eq!(state(&ov, b), BlockState::Base),
                Some(None) => assert_eq!(state(&ov, b), BlockState::Zero),
                Some(Some(tag)) => {
                    data += 1;
                    assert_eq!(state(&ov, b), BlockState::Data);
                    assert_eq!(read_block(&ov, b), block(*tag, b));
                }
            }
        }
    }
    assert_eq!(ov.stats().data_blocks, data);
}

#[test]
fn large_sparse_image() {
    use BlockState::*;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ov");
    let size = 100u64 << 30;
    let ov = Overlay::open(&p, size, ID).unwrap();
    assert_eq!(ov.map(0, size), vec![(0, size, Base)]);
    ov.write(size - B, &block(1, 0)).unwrap();
    ov.zero(1 << 30, 1 << 30).unwrap();
    ov.write(5 << 30, &blocks(2, 0, 256)).unwrap();
    let expect = vec![
        (0, 1 << 30, Base),
        (1 << 30, 1 << 30, Zero),
        (2 << 30, 3 << 30, Base),
        (5 << 30, 1 << 20, Data),
        (
            (5 << 30) + (1 << 20),
            size - B - (5 << 30) - (1 << 20),
            Base,
        ),
        (size - B, B, Data),
    ];
    assert_eq!(ov.map(0, size), expect);
    ov.flush().unwrap();
    crash(ov);
    let ov = Overlay::open(&p, size, ID).unwrap();
    assert_eq!(ov.map(0, size), expect);
    let s = ov.stats();
    assert_eq!((s.data_blocks, s.zero_blocks), (257, 1 << 18));
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.len(), size);
    assert!(md.blocks() * 512 < 4 << 20, "data file is not sparse");
    // The map records runs, not blocks.
    assert!(map_len(&p) < 1024);
}

// ---- kill -9 ----

const KILL_BLOCKS: u64 = 2048;
const KILL_OPS: usize = 50_000;

#[derive(Clone, Copy)]
struct KillOp {
    zero: bool,
    start: u64,
    n: u64,
    flush: bool,
}

fn kill_ops(seed: u64) -> Vec<KillOp> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..KILL_OPS)
        .map(|_| {
            let n = rng.gen_range(1..=16u64);
            KillOp {
                zero: rng.gen_bool(0.2),
                start: rng.gen_range(0..=KILL_BLOCKS - n),
                n,
                flush: rng.gen_bool(0.2),
            }
        })
        .collect()
}

#[test]
#[ignore = "helper process of kill9_keeps_every_flushed_write"]
fn kill9_child() {
    let (Ok(p), Ok(seed)) = (
        std::env::var("VA_OVERLAY_KILL9_PATH"),
        std::env::var("VA_OVERLAY_KILL9_SEED"),
    ) else {
        return;
    };
    let ov = Overlay::open(Path::new(&p), KILL_BLOCKS * B, ID).unwrap();
    ov.compact_min.store(32, Ordering::Relaxed);
    println!("OPEN");
    for (i, op) in kill_ops(seed.parse().unwrap()).iter().enumerate() {
        if op.zero {
            ov.zero(op.start * B, op.n * B).unwrap();
        } else {
            ov.write(op.start * B, &blocks(i as u64, op.start, op.n))
                .unwrap();
        }
        if op.flush {
            ov.flush().unwrap();
            println!("FLUSHED {i}");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Base,
    Zero,
    Write(u64),
    Garbage,
}

#[test]
fn kill9_keeps_every_flushed_write() {
    let mut rng = rand::thread_rng();
    let dir = tempfile::tempdir().unwrap();
    for round in 0..6 {
        let p = dir.path().join(format!("ov{round}"));
        let seed: u64 = rng.gen();
        // Round 0 may kill the child while it creates the overlay.
        let stop_after = if round == 0 { 0 } else { rng.gen_range(1..60) };
        let mut child = spawn_helper(
            "overlay::tests::kill9_child",
            &[
                ("VA_OVERLAY_KILL9_PATH", p.display().to_string()),
                ("VA_OVERLAY_KILL9_SEED", seed.to_string()),
            ],
        );
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut last: Option<usize> = None;
        let mut seen = 0;
        if stop_after > 0 {
            for line in out.lines() {
                // libtest may print "test <name> ... " on the same line before the output.
                let line = line.unwrap();
                let Some((_, n)) = line.split_once("FLUSHED ") else {
                    continue;
                };
                last = Some(n.parse().unwrap());
                seen += 1;
                if seen >= stop_after {
                    break;
                }
            }
            assert_eq!(seen, stop_after, "helper ended early");
        }
        thread::sleep(Duration::from_micros(rng.gen_range(0..5000)));
        child.kill().unwrap();
        child.wait().unwrap();

        let ov = Overlay::open(&p, KILL_BLOCKS * B, ID).unwrap();
        let ops = kill_ops(seed);
        let mut committed = vec![Seen::Base; KILL_BLOCKS as usize];
        let mut later: Vec<Vec<Seen>> = vec![Vec::new(); KILL_BLOCKS as usize];
        for (i, op) in ops.iter().enumerate() {
            let s = if op.zero {
                Seen::Zero
            } else {
                Seen::Write(i as u64)
            };
            for b in op.start..op.start + op.n {
                if last.is_some_and(|l| i <= l) {
                    committed[b as usize] = s;
                } else if later[b as usize].len() < 64 {
                    later[b as usize].push(s);
                }
            }
        }
        let mut flushed_data = 0;
        for b in 0..KILL_BLOCKS {
            let got = match state(&ov, b) {
                BlockState::Base => Seen::Base,
                BlockState::Zero => Seen::Zero,
                BlockState::Data => {
                    let d = read_block(&ov, b);
                    let tag = u64::from_le_bytes(d[..8].try_into().unwrap());
                    if d.iter().all(|&x| x == 0) {
                        Seen::Zero
                    } else if d == block(tag, b) {
                        Seen::Write(tag)
                    } else {
                        Seen::Garbage
                    }
                }
            };
            let want = committed[b as usize];
            flushed_data += u64::from(matches!(want, Seen::Write(_)));
            assert!(
                got == want || later[b as usize].contains(&got),
                "round {round} (seed {seed}, last flush after op {last:?}): block {b} reads \
                 {got:?}, flushed state {want:?}"
            );
        }
        if round > 0 {
            assert!(flushed_data > 0);
        }
        // The overlay keeps working after the crash.
        ov.write(0, &block(u64::MAX, 0)).unwrap();
        ov.flush().unwrap();
    }
}

/// A journal append whose sync failed may have written its records: they must not be
/// replayed after a later, shorter append (which would revert what that one recorded).
#[test]
fn records_of_a_failed_journal_append_are_never_replayed() {
    use BlockState::*;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ov");
    let ov = Overlay::open(&p, 64 * B, ID).unwrap();
    // Five separate runs: five records.
    for b in [0u64, 2, 4, 6, 8] {
        ov.write(b * B, &block(1, b)).unwrap();
    }
    ov.fail_next_journal_sync.store(true, Ordering::SeqCst);
    assert!(ov.flush().is_err());
    // Then all ten blocks are zeroed: the next flush is one record.
    ov.zero(0, 10 * B).unwrap();
    ov.flush().unwrap();
    crash(ov);
    let ov = Overlay::open(&p, 64 * B, ID).unwrap();
    for b in 0..10 {
        assert_eq!(state(&ov, b), Zero, "block {b}");
        assert!(read_block(&ov, b).iter().all(|&x| x == 0), "block {b}");
    }
}
