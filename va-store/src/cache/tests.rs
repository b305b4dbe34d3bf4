use super::*;
use std::collections::HashSet;
use std::thread;

/// Deterministic chunk content: `len` bytes derived from `seed`.
fn chunk(seed: u64, len: usize) -> (Hash, Vec<u8>) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    (Hash::of(&data), data)
}

/// Bytes charged for every chunk file actually in the directory.
fn disk_total(dir: &Path) -> u64 {
    let mut total = 0;
    for sub in fs::read_dir(dir.join("v1/chunks")).unwrap() {
        for f in fs::read_dir(sub.unwrap().path()).unwrap() {
            total += charge(f.unwrap().metadata().unwrap().len());
        }
    }
    total
}

fn disk_has(dir: &Path, h: &Hash) -> bool {
    let hex = h.to_hex();
    dir.join("v1/chunks").join(&hex[..2]).join(hex).exists()
}

fn read_all(c: &ChunkCache, h: &Hash, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    c.read(h, 0, &mut buf).unwrap().then_some(buf)
}

fn set_mtime(dir: &Path, h: &Hash, t: SystemTime) {
    let hex = h.to_hex();
    let f = File::open(dir.join("v1/chunks").join(&hex[..2]).join(hex)).unwrap();
    f.set_modified(t).unwrap();
}

#[test]
fn charge_rounds_to_blocks_plus_overhead() {
    assert_eq!(charge(0), FILE_OVERHEAD);
    assert_eq!(charge(1), 4096 + FILE_OVERHEAD);
    assert_eq!(charge(4096), 4096 + FILE_OVERHEAD);
    assert_eq!(charge(65537), 69632 + FILE_OVERHEAD);
}

#[test]
fn insert_then_read_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let (h, data) = chunk(1, 10_000);
    let (absent, _) = chunk(2, 10);
    assert!(!c.contains(&h));
    assert!(!c.read(&h, 0, &mut [0u8; 4]).unwrap());
    c.insert(&h, &data).unwrap();
    c.insert(&h, &data).unwrap(); // idempotent
    assert!(c.contains(&h));
    assert!(!c.contains(&absent));
    let mut buf = vec![0u8; 1000];
    assert!(c.read(&h, 9000, &mut buf).unwrap());
    assert_eq!(buf, data[9000..]);
    let mut empty = [0u8; 0];
    assert!(c.read(&h, 10_000, &mut empty).unwrap());
    assert_eq!(read_all(&c, &h, data.len()).unwrap(), data);
    let err = c.read(&h, 9001, &mut buf).unwrap_err();
    assert!(matches!(
        err,
        CacheError::OutOfRange {
            size: 10_000,
            end: 10_001,
            ..
        }
    ));
    assert!(err.to_string().contains(&h.to_hex()));
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.inserts, s.evictions), (3, 1, 1, 0));
    assert_eq!(s.bytes_used, charge(10_000));
    assert_eq!(s.max_bytes, 1 << 20);
    assert_eq!(disk_total(dir.path()), charge(10_000));
    // Layout as documented.
    assert_eq!(
        fs::read_to_string(dir.path().join("VERSION")).unwrap(),
        "vastream-chunk-cache 1\n"
    );
    assert!(disk_has(dir.path(), &h));
}

#[test]
fn bound_respected_with_many_inserts() {
    let dir = tempfile::tempdir().unwrap();
    let max = 20 * charge(65536);
    let c = ChunkCache::open(dir.path(), max).unwrap();
    let mut all = Vec::new();
    for i in 0..200u64 {
        let len = 1 + (i as usize * 7919) % 65536;
        let (h, data) = chunk(i, len);
        c.insert(&h, &data).unwrap();
        assert!(
            c.bytes_used() <= max,
            "after insert {i}: {}",
            c.bytes_used()
        );
        assert_eq!(c.bytes_used(), disk_total(dir.path()));
        // The chunk just inserted is always there.
        assert_eq!(read_all(&c, &h, len).unwrap(), data);
        all.push((h, data));
    }
    let s = c.stats();
    assert!(s.evictions > 0);
    assert_eq!(s.inserts, 200);
    // The most recent chunks survived, the oldest did not; whatever is there reads correctly.
    assert!(all[..5].iter().all(|(h, _)| !c.contains(h)));
    assert!(all[195..].iter().all(|(h, _)| c.contains(h)));
    for (h, data) in &all {
        if let Some(got) = read_all(&c, h, data.len()) {
            assert_eq!(&got, data);
        }
    }
}

#[test]
fn evicts_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let c = ChunkCache::open(dir.path(), 4 * charge(4096)).unwrap();
    let chunks: Vec<_> = (0..6).map(|i| chunk(i, 4096)).collect();
    for (h, d) in &chunks[..4] {
        c.insert(h, d).unwrap();
    }
    // Use chunk 0: chunk 1 becomes the least recently used.
    assert!(read_all(&c, &chunks[0].0, 4096).is_some());
    c.insert(&chunks[4].0, &chunks[4].1).unwrap();
    assert!(c.contains(&chunks[0].0));
    assert!(!c.contains(&chunks[1].0));
    assert!(!disk_has(dir.path(), &chunks[1].0));
    // Re-inserting counts as a use: chunk 2 is now the oldest.
    c.insert(&chunks[3].0, &chunks[3].1).unwrap();
    c.insert(&chunks[5].0, &chunks[5].1).unwrap();
    assert!(!c.contains(&chunks[2].0));
    assert!(c.contains(&chunks[3].0));
    assert_eq!(c.stats().evictions, 2);
    assert_eq!(read_all(&c, &chunks[1].0, 4096), None);
}

#[test]
fn chunk_larger_than_bound_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let c = ChunkCache::open(dir.path(), 8192).unwrap();
    let (small, sd) = chunk(1, 100);
    let (big, bd) = chunk(2, 10_000);
    c.insert(&small, &sd).unwrap();
    c.insert(&big, &bd).unwrap();
    assert!(!c.contains(&big));
    assert!(c.contains(&small));
}

#[test]
fn restart_keeps_contents() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<_> = (0..10).map(|i| chunk(i, 1000 + i as usize * 500)).collect();
    {
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        for (h, d) in &chunks {
            c.insert(h, d).unwrap();
        }
    }
    let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let expect: u64 = chunks.iter().map(|(_, d)| charge(d.len() as u64)).sum();
    assert_eq!(c.bytes_used(), expect);
    for (h, d) in &chunks {
        assert!(c.contains(h));
        assert_eq!(read_all(&c, h, d.len()).as_ref(), Some(d));
    }
    assert_eq!(c.stats().inserts, 0);
    // Reopening with a smaller bound evicts down to it.
    drop(c);
    let c = ChunkCache::open(dir.path(), 3 * charge(6000)).unwrap();
    assert!(c.bytes_used() <= 3 * charge(6000));
    assert_eq!(c.bytes_used(), disk_total(dir.path()));
}

#[test]
fn restart_orders_by_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<_> = (0..6).map(|i| chunk(i, 4096)).collect();
    let now = SystemTime::now();
    {
        let c = ChunkCache::open(dir.path(), 5 * charge(4096)).unwrap();
        for (h, d) in &chunks[..5] {
            c.insert(h, d).unwrap();
        }
    }
    // Chunk 0 was used most recently, chunk 1 least recently, then 2, 3, 4.
    set_mtime(dir.path(), &chunks[0].0, now);
    for (i, (h, _)) in chunks.iter().enumerate().take(5).skip(1) {
        set_mtime(
            dir.path(),
            h,
            now - Duration::from_secs(1000 - 100 * i as u64),
        );
    }
    let c = ChunkCache::open(dir.path(), 5 * charge(4096)).unwrap();
    c.insert(&chunks[5].0, &chunks[5].1).unwrap();
    assert!(!c.contains(&chunks[1].0));
    for i in [0, 2, 3, 4, 5] {
        assert!(c.contains(&chunks[i].0), "chunk {i}");
    }
}

#[test]
fn hits_refresh_mtime_lazily() {
    let dir = tempfile::tempdir().unwrap();
    let (h, d) = chunk(7, 5000);
    let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    c.insert(&h, &d).unwrap();
    let hex = h.to_hex();
    let path = dir.path().join("v1/chunks").join(&hex[..2]).join(&hex);
    let mtime = || fs::metadata(&path).unwrap().modified().unwrap();
    let old = SystemTime::now() - Duration::from_secs(3600);
    // Stored just now: a hit does not touch the file again.
    set_mtime(dir.path(), &h, old);
    assert!(read_all(&c, &h, d.len()).is_some());
    assert_eq!(mtime(), old);
    drop(c);
    // Another process (or a restart) sees the old mtime: its first hit refreshes it, once.
    let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    assert!(read_all(&c, &h, d.len()).is_some());
    assert!(mtime() > old + Duration::from_secs(3000));
    set_mtime(dir.path(), &h, old);
    assert!(read_all(&c, &h, d.len()).is_some());
    assert_eq!(mtime(), old);
}

#[test]
fn two_instances_share_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let max = 16 * charge(8192);
    let a = ChunkCache::open(dir.path(), max).unwrap();
    let b = ChunkCache::open(dir.path(), max).unwrap();
    let mut all = Vec::new();
    for i in 0..100u64 {
        let (h, d) = chunk(i, 1000 + (i as usize * 37) % 7000);
        let c = if i % 2 == 0 { &a } else { &b };
        c.insert(&h, &d).unwrap();
        let total = disk_total(dir.path());
        assert!(total <= max, "after insert {i}: {total} > {max}");
        assert_eq!(a.bytes_used(), total);
        all.push((h, d));
    }
    // Each instance reads what the other inserted (when still cached).
    let last_a = &all[98];
    let last_b = &all[99];
    assert_eq!(
        read_all(&b, &last_a.0, last_a.1.len()).as_ref(),
        Some(&last_a.1)
    );
    assert_eq!(
        read_all(&a, &last_b.0, last_b.1.len()).as_ref(),
        Some(&last_b.1)
    );
    let evicted = a.stats().evictions + b.stats().evictions;
    let files = all.iter().filter(|(h, _)| disk_has(dir.path(), h)).count() as u64;
    assert_eq!(files + evicted, 100);
}

#[test]
fn chunk_evicted_by_other_instance_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let max = 4 * charge(4096);
    let b = ChunkCache::open(dir.path(), max).unwrap();
    let (x, xd) = chunk(100, 4096);
    let (y, yd) = chunk(101, 4096);
    b.insert(&x, &xd).unwrap();
    b.insert(&y, &yd).unwrap();
    // b holds y open (descriptor cache), not x.
    assert!(read_all(&b, &y, 4096).is_some());
    let old = SystemTime::now() - Duration::from_secs(100);
    set_mtime(dir.path(), &x, old);
    set_mtime(dir.path(), &y, old + Duration::from_secs(1));
    let a = ChunkCache::open(dir.path(), max).unwrap();
    for i in 0..4 {
        let (h, d) = chunk(i, 4096);
        a.insert(&h, &d).unwrap();
    }
    assert!(!disk_has(dir.path(), &x) && !disk_has(dir.path(), &y));
    assert_eq!(a.stats().evictions, 2);
    // b never opened x: a miss.
    assert!(!b.read(&x, 0, &mut [0u8; 16]).unwrap());
    assert!(!b.contains(&x));
    // b still holds y open: the bytes are still right, until b rescans.
    assert_eq!(read_all(&b, &y, 4096), Some(yd.clone()));
    b.rescan().unwrap();
    assert!(!b.read(&y, 0, &mut [0u8; 16]).unwrap());
    assert_eq!(b.stats().misses, 2);
    // Re-inserting after the miss works and is accounted once.
    b.insert(&x, &xd).unwrap();
    assert_eq!(read_all(&a, &x, 4096), Some(xd));
    assert_eq!(disk_total(dir.path()), b.bytes_used());
    assert!(b.bytes_used() <= max);
}

#[test]
fn same_chunk_inserted_concurrently_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let caches: Vec<ChunkCache> = (0..2)
        .map(|_| ChunkCache::open(dir.path(), 1 << 20).unwrap())
        .collect();
    let (h, d) = chunk(5, 30_000);
    thread::scope(|s| {
        for c in &caches {
            for _ in 0..3 {
                s.spawn(|| c.insert(&h, &d).unwrap());
            }
        }
    });
    assert_eq!(caches[0].bytes_used(), charge(30_000));
    assert_eq!(disk_total(dir.path()), charge(30_000));
    assert_eq!(caches[0].stats().inserts + caches[1].stats().inserts, 1);
    assert!(fs::read_dir(dir.path().join("v1/tmp"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn concurrent_threads_read_and_insert() {
    let dir = tempfile::tempdir().unwrap();
    let max = 16 * charge(16384);
    let c = ChunkCache::open(dir.path(), max).unwrap();
    let pool: Vec<_> = (0..64)
        .map(|i| chunk(i, 4096 + (i as usize % 4) * 4096))
        .collect();
    thread::scope(|s| {
        for t in 0..8u64 {
            let (c, pool) = (&c, &pool);
            s.spawn(move || {
                let mut x = t + 1;
                for _ in 0..400 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let (h, d) = &pool[(x >> 33) as usize % pool.len()];
                    let off = (x >> 20) as usize % d.len();
                    let mut buf = vec![0u8; d.len() - off];
                    if c.read(h, off as u32, &mut buf).unwrap() {
                        assert_eq!(&buf[..], &d[off..]);
                    } else {
                        c.insert(h, d).unwrap();
                    }
                }
            });
        }
    });
    let total = disk_total(dir.path());
    assert!(total <= max);
    assert_eq!(c.bytes_used(), total);
    let s = c.stats();
    assert!(s.hits > 0 && s.misses > 0 && s.evictions > 0);
    assert_eq!(s.hits + s.misses, 8 * 400);
}

#[test]
fn unknown_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("VERSION"), "vastream-chunk-cache 2\n").unwrap();
    let err = ChunkCache::open(dir.path(), 1 << 20).err().unwrap();
    assert!(
        matches!(&err, CacheError::UnknownVersion { found, .. } if found == "vastream-chunk-cache 2")
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.path().join("VERSION").display().to_string()),
        "{msg}"
    );
    assert!(!dir.path().join("v1").exists());
}

#[test]
fn error_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    fs::write(&file, "x").unwrap();
    let err = ChunkCache::open(&file, 1 << 20).err().unwrap();
    assert!(matches!(err, CacheError::Io { .. }));
    assert!(err.to_string().contains("plain-file"), "{err}");
}

#[test]
fn damaged_counter_and_stray_files_are_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<_> = (0..3).map(|i| chunk(i, 3000)).collect();
    {
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        for (h, d) in &chunks {
            c.insert(h, d).unwrap();
        }
    }
    fs::write(dir.path().join("v1/usage"), b"garbage").unwrap();
    fs::write(dir.path().join("v1/chunks/00/not-a-chunk"), b"x").unwrap();
    let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(c.bytes_used(), 3 * charge(3000));
    // A truncated chunk file (not something the cache writes) reads as a miss, is removed,
    // and the chunk goes in again on insert.
    let hex = chunks[0].0.to_hex();
    let path = dir.path().join("v1/chunks").join(&hex[..2]).join(&hex);
    drop(c);
    fs::write(&path, &chunks[0].1[..100]).unwrap();
    let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(c.bytes_used(), 2 * charge(3000) + charge(100));
    let mut buf = vec![0u8; 3000];
    assert!(!c.read(&chunks[0].0, 0, &mut buf).unwrap());
    assert_eq!(c.stats().discarded, 1);
    assert!(!path.exists());
    assert_eq!(c.bytes_used(), 2 * charge(3000));
    c.insert(&chunks[0].0, &chunks[0].1).unwrap();
    assert_eq!(
        read_all(&c, &chunks[0].0, 3000).as_ref(),
        Some(&chunks[0].1)
    );
    assert_eq!(c.bytes_used(), 3 * charge(3000));
    let names: HashSet<_> = fs::read_dir(dir.path().join("v1/chunks/00"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.contains(std::ffi::OsStr::new("not-a-chunk")));
}

#[test]
fn instance_that_knows_nothing_rescans_to_evict() {
    let dir = tempfile::tempdir().unwrap();
    let max = 4 * charge(4096);
    let a = ChunkCache::open(dir.path(), max).unwrap();
    let b = ChunkCache::open(dir.path(), max).unwrap();
    let chunks: Vec<_> = (0..5).map(|i| chunk(i, 4096)).collect();
    let t0 = SystemTime::now() - Duration::from_secs(100);
    for (i, (h, d)) in chunks[..4].iter().enumerate() {
        b.insert(h, d).unwrap();
        // Distinct mtimes (file times may be coarser than the insert rate).
        set_mtime(dir.path(), h, t0 + Duration::from_secs(i as u64));
    }
    // a's index is empty: to make room it must learn b's chunks from the directory.
    a.insert(&chunks[4].0, &chunks[4].1).unwrap();
    assert_eq!(a.stats().evictions, 1);
    assert!(!disk_has(dir.path(), &chunks[0].0));
    assert!(chunks[1..].iter().all(|(h, _)| disk_has(dir.path(), h)));
    assert_eq!(disk_total(dir.path()), max);
    assert_eq!(b.bytes_used(), max);
}

fn chunk_file(dir: &Path, h: &Hash) -> PathBuf {
    let hex = h.to_hex();
    dir.join("v1/chunks").join(&hex[..2]).join(hex)
}

#[test]
fn chunk_files_are_verified_on_first_use_and_damaged_ones_are_refetched() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<_> = (0..4).map(|i| chunk(i + 10, 5000)).collect();
    {
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        for (h, d) in &chunks {
            c.insert(h, d).unwrap();
        }
    }
    // 0: the same length, other bytes (changed in place); 1: truncated; 2: a symbolic link
    // to a file holding the right bytes (never followed); 3: untouched.
    let p0 = chunk_file(dir.path(), &chunks[0].0);
    let mut bad = chunks[0].1.clone();
    bad[17] ^= 1;
    fs::write(&p0, &bad).unwrap();
    let p1 = chunk_file(dir.path(), &chunks[1].0);
    fs::write(&p1, &chunks[1].1[..10]).unwrap();
    let p2 = chunk_file(dir.path(), &chunks[2].0);
    let outside = dir.path().join("outside");
    fs::write(&outside, &chunks[2].1).unwrap();
    fs::remove_file(&p2).unwrap();
    std::os::unix::fs::symlink(&outside, &p2).unwrap();

    let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    for (h, _) in &chunks[..3] {
        assert_eq!(
            read_all(&c, h, 5000),
            None,
            "a damaged file reads as a miss"
        );
        assert!(!c.contains(h));
    }
    assert_eq!(c.stats().discarded, 3);
    assert!(!p0.exists() && !p1.exists() && fs::symlink_metadata(&p2).is_err());
    assert!(outside.exists(), "the link's target is not touched");
    assert_eq!(
        read_all(&c, &chunks[3].0, 5000).as_ref(),
        Some(&chunks[3].1)
    );
    // Fetched again, they read back right.
    for (h, d) in &chunks[..3] {
        c.insert(h, d).unwrap();
        assert_eq!(read_all(&c, h, 5000).as_ref(), Some(d));
    }
    assert_eq!(c.bytes_used(), 4 * charge(5000));
}

#[test]
fn a_chunk_file_truncated_while_open_is_a_miss_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let (h, d) = chunk(42, 65536);
    c.insert(&h, &d).unwrap();
    assert_eq!(read_all(&c, &h, 65536).as_ref(), Some(&d));
    // The descriptor is kept open; the file shrinks behind the process's back.
    File::options()
        .write(true)
        .open(chunk_file(dir.path(), &h))
        .unwrap()
        .set_len(100)
        .unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(!c.read(&h, 60_000 & !4095, &mut buf).unwrap());
    c.insert(&h, &d).unwrap();
    assert_eq!(read_all(&c, &h, 65536).as_ref(), Some(&d));
}

#[test]
fn the_cache_is_private_and_refused_when_others_may_write_to_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let c = ChunkCache::open(&root, 1 << 20).unwrap();
    let (h, d) = chunk(7, 100);
    c.insert(&h, &d).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("v1/chunks")), 0o700);
    assert_eq!(mode(&chunk_file(&root, &h)), 0o600);
    drop(c);
    fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
    let err = ChunkCache::open(&root, 1 << 20).err().unwrap();
    assert!(
        matches!(err, CacheError::Insecure { mode: 0o777, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("other users may write"), "{err}");
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(
        ChunkCache::open(&root, 1 << 20).is_ok(),
        "readable by others is allowed"
    );
}
