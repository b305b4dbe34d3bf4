//! Laying out an existing bundle again with a plan (`va repack`), without its raw images.
//!
//! The plan's chunks (the working set) are fetched through the opened appliance (from its
//! origin or the local cache, verified), compressed again and written first and contiguous
//! into a new pack; every other chunk stays in the pack it is in; new index pages name both;
//! and a version 2 manifest records where each image's working set ends. So what is new is one
//! working-set pack, one index pack and the manifest: the rest of the bundle is reused as is.
//!
//! The old packs are named from the new bundle directory by `old_pack_path`: for a bundle
//! repacked in place or uploaded into the same directory as the old one, the old paths stay
//! valid as they are; for a new local directory, a relative path to the old one.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::Instant;

use crate::appliance::Appliance;
use crate::format::{BlobRef, ChunkEntry, ImageKind, PackInfo};
use crate::pack::{
    finish_pack, io, record_blob_refs, write_index, write_manifest, IndexTarget, PackError,
    PackReport, PackWriter, PlanLayout,
};
use crate::trace::PlanItem;
use crate::Hash;

/// Repacking parameters.
#[derive(Debug, Clone)]
pub struct RepackOptions {
    /// The chunks to place first, in this order.
    pub plan: Vec<PlanItem>,
    /// zstd level of the working-set pack.
    pub level: i32,
    /// Start a new pack file beyond this size.
    pub max_pack_size: u64,
}

/// Blobs fetched per origin round.
const BATCH: usize = 256;

/// Repacks `app` into `out` with `opts.plan` first; `old_pack_path` names each old pack (by
/// its path in the old manifest) from `out`. `progress(done, total)` counts working-set chunks.
pub fn repack(
    app: &Appliance,
    out: &Path,
    old_pack_path: &dyn Fn(&str) -> Result<String, PackError>,
    opts: &RepackOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<PackReport, PackError> {
    let started = Instant::now();
    let m = app.manifest().clone();
    let images: Vec<(ImageKind, u64)> = m.images.iter().map(|i| (i.kind, i.size)).collect();
    let kinds: Vec<ImageKind> = images.iter().map(|x| x.0).collect();
    let mut report = PackReport::default();
    for &(_, size) in &images {
        report.input_bytes += size;
        report.chunks += m.chunks_of(size);
    }
    // The working set, in plan order.
    let mut layout = PlanLayout::new(images.len());
    let mut plen_of: HashMap<Hash, (BlobRef, u32)> = HashMap::new();
    for item in &opts.plan {
        let Some(i) = kinds.iter().position(|&k| k == item.image) else {
            continue;
        };
        if item.chunk >= m.chunks_of(images[i].1) {
            continue;
        }
        report.planned_chunks += 1;
        if let ChunkEntry::Stored(b) = app.entry(item.image, item.chunk)? {
            plen_of
                .entry(b.hash)
                .or_insert((b, m.chunk_len(images[i].1, item.chunk)));
            layout.add(i, b.hash);
        }
    }
    let packs_dir = out.join("packs");
    fs::create_dir_all(&packs_dir).map_err(io(&packs_dir))?;
    let rel = "packs/";
    let mut packs: Vec<PackInfo> = Vec::new();
    let mut new_refs: HashMap<Hash, BlobRef> = HashMap::new();
    let mut writer = PackWriter::new(&packs_dir)?;
    let mut in_open: Vec<(Hash, u64, u32)> = Vec::new();
    let total = layout.order.len() as u64;
    for (n, batch) in layout.order.chunks(BATCH).enumerate() {
        progress((n * BATCH) as u64, total);
        let want: Vec<(BlobRef, u32)> = batch.iter().map(|h| plen_of[h]).collect();
        let mut plain: HashMap<Hash, Vec<u8>> = HashMap::with_capacity(want.len());
        app.fetch_blobs("chunk", &want, &mut |b, p| {
            plain.insert(b.hash, p.to_vec());
        })?;
        for h in batch {
            let p = plain
                .get(h)
                .ok_or(PackError::ChunkWithoutLocation { hash: *h })?;
            let z = zstd::bulk::compress(p, opts.level).map_err(|source| PackError::Compress {
                what: "chunk",
                source,
            })?;
            let at = writer.append(h, &z, p.len() as u32)?;
            in_open.push((*h, at, z.len() as u32));
            report.stored_chunks += 1;
            report.stored_plain += p.len() as u64;
            report.stored_compressed += z.len() as u64;
            if writer.len() >= opts.max_pack_size {
                let full = std::mem::replace(&mut writer, PackWriter::new(&packs_dir)?);
                let idx = finish_pack(full, rel, &packs_dir, &mut packs, &mut report)?;
                record_blob_refs(&mut in_open, idx, &mut new_refs);
            }
        }
    }
    if in_open.is_empty() {
        writer.abandon();
    } else {
        let idx = finish_pack(writer, rel, &packs_dir, &mut packs, &mut report)?;
        record_blob_refs(&mut in_open, idx, &mut new_refs);
    }
    progress(total, total);
    // The index: the working set's new copies, every other chunk where it was.
    let mut remap: HashMap<u32, u32> = HashMap::new();
    let mut entry =
        |i: usize, c: u64, packs: &mut Vec<PackInfo>| -> Result<ChunkEntry, PackError> {
            let b = match app.entry(kinds[i], c)? {
                ChunkEntry::Zero => return Ok(ChunkEntry::Zero),
                ChunkEntry::Stored(b) => b,
            };
            if let Some(n) = new_refs.get(&b.hash) {
                return Ok(ChunkEntry::Stored(*n));
            }
            let pack = match remap.get(&b.pack) {
                Some(&p) => p,
                None => {
                    let old = m
                        .packs
                        .get(b.pack as usize)
                        .ok_or(PackError::ChunkWithoutLocation { hash: b.hash })?;
                    packs.push(PackInfo {
                        path: old_pack_path(&old.path)?,
                        size: old.size,
                        hash: old.hash,
                    });
                    let p = (packs.len() - 1) as u32;
                    remap.insert(b.pack, p);
                    p
                }
            };
            Ok(ChunkEntry::Stored(BlobRef { pack, ..b }))
        };
    let index = write_index(
        &images,
        &mut entry,
        &IndexTarget {
            chunk_size: m.chunk_size,
            page_chunks: m.page_chunks,
            level: opts.level,
            dir: &packs_dir,
            rel,
        },
        &mut packs,
        &mut report,
    )?;
    let working_sets = layout.working_sets(&kinds, &new_refs)?;
    report.working_sets = working_sets.clone();
    write_manifest(
        out,
        crate::format::Manifest {
            chunk_size: m.chunk_size,
            page_chunks: m.page_chunks,
            created: 0,
            packs,
            images: index,
            working_sets,
        },
        &mut report,
    )?;
    report.elapsed = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appliance::OpenOptions;
    use crate::pack::{pack, PackInput, PackOptions};

    fn read_all(url: &str, kind: ImageKind) -> Vec<u8> {
        let app = Appliance::open(url, &OpenOptions::default()).unwrap();
        let size = app.image(kind).unwrap().size;
        let cs = app.manifest().chunk_size as u64;
        let mut out = Vec::new();
        for c in 0..size.div_ceil(cs) {
            match app.entry(kind, c).unwrap() {
                ChunkEntry::Zero => out.resize(out.len() + app.chunk_len(kind, c) as usize, 0),
                ChunkEntry::Stored(b) => {
                    app.fetch_blobs("chunk", &[(b, app.chunk_len(kind, c))], &mut |_, p| {
                        out.extend_from_slice(p)
                    })
                    .unwrap();
                }
            }
        }
        out
    }

    #[test]
    fn repack_writes_only_the_working_set_and_reads_back_the_same() {
        let d = tempfile::tempdir().unwrap();
        let mut disk = vec![0u8; 40 * 4096];
        for (i, b) in disk.iter_mut().enumerate() {
            *b = (i / 4096) as u8 ^ (i % 249) as u8 ^ 0x33;
        }
        disk[8 * 4096..10 * 4096].fill(0);
        let mut mem = disk.clone();
        mem.reverse();
        let (dp, mp) = (d.path().join("disk"), d.path().join("mem"));
        std::fs::write(&dp, &disk).unwrap();
        std::fs::write(&mp, &mem).unwrap();
        let a = d.path().join("a");
        pack(
            &[
                PackInput {
                    kind: ImageKind::Disk,
                    path: dp,
                },
                PackInput {
                    kind: ImageKind::Mem,
                    path: mp,
                },
            ],
            &a,
            &PackOptions {
                chunk_size: 4096,
                page_chunks: 16,
                ..Default::default()
            },
            &|_, _, _| {},
        )
        .unwrap();
        let plan: Vec<PlanItem> = [
            (ImageKind::Mem, 5),
            (ImageKind::Disk, 2),
            (ImageKind::Disk, 8),
            (ImageKind::Mem, 6),
        ]
        .into_iter()
        .map(|(image, chunk)| PlanItem { image, chunk })
        .collect();
        let opts = RepackOptions {
            plan,
            level: 3,
            max_pack_size: 1 << 30,
        };
        let app = Appliance::open(a.to_str().unwrap(), &OpenOptions::default()).unwrap();
        // Into another directory: the old packs are named from there.
        let b = d.path().join("b");
        std::fs::create_dir_all(&b).unwrap();
        let rel = |p: &str| -> Result<String, PackError> {
            Ok(format!(
                "{}{}",
                crate::pack::relative_dir(&b, &a.join("packs"))?,
                &p["packs/".len()..]
            ))
        };
        let r = repack(&app, &b, &rel, &opts, &|_, _| {}).unwrap();
        assert_eq!(
            (r.planned_chunks, r.stored_chunks),
            (4, 3),
            "the zero chunk is not stored"
        );
        assert_eq!(
            r.new_packs.len(),
            2,
            "one working-set pack and one index pack"
        );
        let m =
            crate::format::Manifest::decode(&std::fs::read(b.join("manifest")).unwrap()).unwrap();
        assert_eq!(m.working_set(ImageKind::Mem).unwrap().chunks, 2);
        assert_eq!(m.working_set(ImageKind::Disk).unwrap().chunks, 1);
        assert!(m.packs[0].path.starts_with("packs/"));
        assert!(
            m.packs.iter().any(|p| p.path.starts_with("../a/packs/")),
            "{:?}",
            m.packs
        );
        let bu = b.to_str().unwrap();
        assert_eq!(read_all(bu, ImageKind::Disk), disk);
        assert_eq!(read_all(bu, ImageKind::Mem), mem);
        let app_b = Appliance::open(bu, &OpenOptions::default()).unwrap();
        let ChunkEntry::Stored(c5) = app_b.entry(ImageKind::Mem, 5).unwrap() else {
            panic!()
        };
        assert_eq!((c5.pack, c5.offset), (0, crate::format::PACK_HEADER_LEN));
        // In place: the old paths stay as they are.
        let r2 = repack(&app, &a, &|p| Ok(p.to_string()), &opts, &|_, _| {}).unwrap();
        assert_eq!(r2.working_sets, r.working_sets);
        assert_eq!(read_all(a.to_str().unwrap(), ImageKind::Mem), mem);
    }
}
