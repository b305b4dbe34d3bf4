//! Writes the seed corpus of every fuzz target into `seeds/<target>/` (next to Cargo.toml):
//! valid encodings made with va-store's own encoders, so that fuzzing starts from inputs that
//! get past the magic numbers and checksums.
//!
//! Run from va-store/fuzz: `cargo run --example gen_seeds` (scripts/fuzz-smoke.sh does it when
//! the seeds directory is missing).

use std::fs;
use std::path::Path;

use va_store::format::{
    encode_pack_header, encode_pack_table, encode_page, BlobRef, ChunkEntry, ImageInfo, ImageKind,
    Manifest, PackEntry, PackInfo, PageRef, WorkingSet,
};
use va_store::Hash;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).expect("create seed directory");
    fs::write(d.join(name), bytes).expect("write seed");
}

fn blob(pack: u32, offset: u64, clen: u32, tag: &[u8]) -> BlobRef {
    BlobRef {
        pack,
        offset,
        clen,
        hash: Hash::of(tag),
    }
}

fn manifests() -> Vec<Manifest> {
    let packs = vec![
        PackInfo {
            path: "packs/aa.pack".into(),
            size: 100_000,
            hash: Hash::of(b"pack a"),
        },
        PackInfo {
            path: "../shared/packs/bb.pack".into(),
            size: 5_000,
            hash: Hash::of(b"pack b"),
        },
    ];
    let small = Manifest {
        chunk_size: 4096,
        page_chunks: 4,
        created: 1_700_000_000,
        packs: packs[..1].to_vec(),
        images: vec![ImageInfo {
            kind: ImageKind::Disk,
            size: 4096 * 6 + 100,
            pages: vec![
                PageRef::Stored {
                    blob: blob(0, 16, 200, b"page 0"),
                    plen: 8 + 4 * 49,
                },
                PageRef::Zero,
            ],
        }],
        working_sets: Vec::new(),
    };
    let multi = Manifest {
        chunk_size: 65536,
        page_chunks: 2,
        created: 7,
        packs,
        images: vec![
            ImageInfo {
                kind: ImageKind::Disk,
                size: 65536 * 3,
                pages: vec![
                    PageRef::Zero,
                    PageRef::Stored {
                        blob: blob(1, 4000, 50, b"disk page 1"),
                        plen: 8 + 1,
                    },
                ],
            },
            ImageInfo {
                kind: ImageKind::Mem,
                size: 65536,
                pages: vec![PageRef::Stored {
                    blob: blob(0, 16, 100, b"mem page 0"),
                    plen: 8 + 49,
                }],
            },
            ImageInfo {
                kind: ImageKind::State,
                size: 0,
                pages: vec![],
            },
            ImageInfo {
                kind: ImageKind::Machine,
                size: 300,
                pages: vec![PageRef::Zero],
            },
        ],
        working_sets: Vec::new(),
    };
    // Direct kernel boot: a disk, a kernel and an initrd (image kinds 4 and 5).
    let boot = Manifest {
        chunk_size: 65536,
        page_chunks: 2,
        created: 1_750_000_000,
        packs: multi.packs.clone(),
        images: vec![
            ImageInfo {
                kind: ImageKind::Disk,
                size: 65536 * 2,
                pages: vec![PageRef::Stored {
                    blob: blob(0, 16, 120, b"disk page 0"),
                    plen: 8 + 2 * 49,
                }],
            },
            ImageInfo {
                kind: ImageKind::Kernel,
                size: 65536 * 2 + 4321,
                pages: vec![
                    PageRef::Stored {
                        blob: blob(0, 200, 110, b"kernel page 0"),
                        plen: 8 + 2 * 49,
                    },
                    PageRef::Stored {
                        blob: blob(1, 16, 60, b"kernel page 1"),
                        plen: 8 + 49,
                    },
                ],
            },
            ImageInfo {
                kind: ImageKind::Initrd,
                size: 65536,
                pages: vec![PageRef::Zero],
            },
        ],
        working_sets: Vec::new(),
    };
    // Several disks: disk, disk1 and disk7 (image kinds 0, 6 and 12), not in code order.
    let disks = Manifest {
        chunk_size: 65536,
        page_chunks: 2,
        created: 1_760_000_000,
        packs: multi.packs.clone(),
        images: vec![
            ImageInfo {
                kind: ImageKind::Disk,
                size: 65536,
                pages: vec![PageRef::Stored {
                    blob: blob(0, 16, 120, b"disk page 0"),
                    plen: 8 + 49,
                }],
            },
            ImageInfo {
                kind: ImageKind::Disk7,
                size: 65536 * 3,
                pages: vec![PageRef::Zero, PageRef::Zero],
            },
            ImageInfo {
                kind: ImageKind::Disk1,
                size: 65536 * 2 + 512,
                pages: vec![
                    PageRef::Stored {
                        blob: blob(0, 200, 110, b"disk1 page 0"),
                        plen: 8 + 2 * 49,
                    },
                    PageRef::Stored {
                        blob: blob(1, 16, 60, b"disk1 page 1"),
                        plen: 8 + 49,
                    },
                ],
            },
        ],
        working_sets: Vec::new(),
    };
    // A version 2 manifest: the multi-image one with a recorded working set.
    let mut planned = multi.clone();
    planned.working_sets.push(WorkingSet {
        kind: planned.images[0].kind,
        chunks: 1,
        bytes: 90,
        end_pack: 0,
        end_offset: 106,
    });
    vec![small, multi, boot, disks, planned]
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");

    // manifest: whole encodings, and bodies without the trailer (the target reseals them).
    for (i, m) in manifests().iter().enumerate() {
        let b = m.encode();
        write(&dir, "manifest", &format!("full-{i}"), &b);
        write(&dir, "manifest", &format!("body-{i}"), &b[..b.len() - 32]);
    }

    // page: 11 header bytes shaping the manifest, then a page that fits it.
    // page_chunks = 1 + 3 = 4; size = 250 * 97 = 24250 (6 chunks); 2 packs of 16 + 4000 and
    // 16 + 300 bytes; page 0 (4 entries) and page 1 (2 entries).
    let mut h = vec![3u8];
    h.extend_from_slice(&250u16.to_le_bytes());
    h.push(1);
    h.extend_from_slice(&4000u16.to_le_bytes());
    h.extend_from_slice(&300u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    for (p, n) in [(0u8, 4usize), (1, 2)] {
        let mut seed = h.clone();
        seed.push(p);
        let entries: Vec<ChunkEntry> = (0..n)
            .map(|i| match i % 3 {
                0 => ChunkEntry::Zero,
                1 => ChunkEntry::Stored(blob(0, 16 + 100 * i as u64, 90, &[i as u8])),
                _ => ChunkEntry::Stored(blob(1, 16, 300, b"last")),
            })
            .collect();
        seed.extend_from_slice(&encode_page(&entries));
        write(&dir, "page", &format!("page-{p}"), &seed);
    }

    // pack_table: size hint, then the rest of a pack after its header (blobs, table, tail).
    for n in [0u64, 1, 3] {
        let blobs = vec![0x5au8; 100];
        let table_off = 16 + blobs.len() as u64;
        let entries: Vec<PackEntry> = (0..n)
            .map(|i| PackEntry {
                hash: Hash::of(&i.to_le_bytes()),
                offset: 16 + 30 * i,
                clen: 30,
                plen: 4096,
            })
            .collect();
        let t = encode_pack_table(&entries, table_off);
        let size = encode_pack_header().len() as u64 + blobs.len() as u64 + t.len() as u64;
        let mut seed = size.to_le_bytes().to_vec();
        seed.extend_from_slice(&blobs);
        seed.extend_from_slice(&t);
        write(&dir, "pack_table", &format!("table-{n}"), &seed);
        // The tail alone first, for the arbitrary-size tail check.
        let mut seed = size.to_le_bytes().to_vec();
        seed.extend_from_slice(&t[t.len() - 64..]);
        write(&dir, "pack_table", &format!("tail-{n}"), &seed);
    }

    // http_reply: 7 parameter bytes (mode, a, 3 more bytes of a, b, 1 more byte of b), then
    // the reply. Mode 0 = get_range(a, b + 1), mode 1 = get_file(a).
    let range = |a: u8, b: u8| vec![0u8, a, 0, 0, 0, b, 0];
    let file = |max: u8| vec![1u8, max, 0, 0, 0, 0, 0];
    let replies: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "206",
            range(0, 9),
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/100\r\n\
             Content-Length: 10\r\n\r\n0123456789",
        ),
        (
            "206-chunked",
            range(5, 4),
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 5-9/*\r\n\
             Transfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: v\r\n\r\n",
        ),
        (
            "206-close",
            range(1, 1),
            "HTTP/1.0 206 Partial Content\r\nContent-Range: bytes 1-2/3\r\n\
             Connection: close\r\n\r\nxy",
        ),
        (
            "206-clamped",
            range(0, 9),
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4/5\r\n\
             Content-Length: 5\r\n\r\nabcde",
        ),
        (
            "200-whole",
            range(2, 2),
            "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: keep-alive\r\n\r\nabcdef",
        ),
        (
            "100-then-206",
            range(0, 0),
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial Content\r\n\
             Content-Range: bytes 0-0/1\r\nContent-Length: 1\r\n\r\nz",
        ),
        (
            "416",
            range(50, 9),
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */40\r\n\
             Content-Length: 0\r\n\r\n",
        ),
        (
            "404",
            range(0, 0),
            "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
        ),
        (
            "503",
            file(100),
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "file-200",
            file(100),
            "HTTP/1.1 200 OK\r\nContent-Length: 8\r\nContent-Encoding: identity\r\n\r\nVASTMANI",
        ),
        (
            "file-chunked",
            file(100),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\nVASTMANI\r\n0\r\n\r\n",
        ),
        (
            "file-close",
            file(100),
            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nVASTMANI and more",
        ),
        (
            "file-too-large",
            file(4),
            "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nVASTMANI",
        ),
    ];
    for (name, mut seed, reply) in replies {
        seed.extend_from_slice(reply.as_bytes());
        write(&dir, "http_reply", name, &seed);
    }

    // plan
    let h = Hash::of(b"appliance");
    write(
        &dir,
        "plan",
        "trace",
        format!(
            "# vastream-trace v1 chunk_size=65536 appliance={h}\n1520 disk 0\n1733 disk 1\n\
             90211 mem 4410\n90212 mem 4410\n"
        )
        .as_bytes(),
    );
    write(
        &dir,
        "plan",
        "plan",
        b"disk 17\n\n# comment\nstate 0\nmachine 0\n",
    );
    write(&dir, "plan", "plan-boot", b"kernel 0\nkernel 1\n12 initrd 3\ndisk 0\n");

    // strings: location, newline, bundle-relative path.
    for (i, s) in [
        format!("http://example.com:8080/app/#{h}\n../shared/packs/{h}.pack"),
        format!(
            "https://[::1]:8443/a/b/c#{}\npacks/x.pack",
            h.to_hex().to_uppercase()
        ),
        "http://host/app\n../../../x".to_string(),
        format!("/srv/bundles/app/#{h}\n"),
        "file:///srv/app/\npacks/a.pack".to_string(),
    ]
    .iter()
    .enumerate()
    {
        write(&dir, "strings", &format!("s{i}"), s.as_bytes());
    }

    // blob: 4-byte plain length, then a zstd frame.
    let plain: Vec<u8> = b"vastream blob "
        .iter()
        .copied()
        .cycle()
        .take(4096)
        .collect();
    for (name, data) in [
        ("text", &plain[..]),
        ("short", &plain[..10]),
        ("empty", &[][..]),
    ] {
        let z = zstd::bulk::compress(data, 3).expect("compress");
        let mut seed = (data.len() as u32).to_le_bytes().to_vec();
        seed.extend_from_slice(&z);
        write(&dir, "blob", name, &seed);
    }

    // bundle: no damage, over a region long enough to cover every blob of the fixture.
    write(&dir, "bundle", "intact", &[0u8; 4096]);

    println!("seeds written to {}", dir.display());
}
