//! Encoding of server messages: greeting, option replies, simple replies and structured
//! reply chunk headers.

use crate::proto::*;

/// The 18-byte fixed newstyle greeting.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Appends an option reply to `out`: header, then the concatenation of `parts`.
pub fn opt_reply(out: &mut Vec<u8>, opt: u32, rep: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&rep.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Appends an `NBD_REP_INFO` / `NBD_INFO_EXPORT` reply.
pub fn info_export(out: &mut Vec<u8>, opt: u32, size: u64, flags: u16) {
    opt_reply(
        out,
        opt,
        REP_INFO,
        &[
            &INFO_EXPORT.to_be_bytes(),
            &size.to_be_bytes(),
            &flags.to_be_bytes(),
        ],
    );
}

/// Appends an `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` reply.
pub fn info_block_size(out: &mut Vec<u8>, opt: u32, min: u32, pref: u32, max: u32) {
    opt_reply(
        out,
        opt,
        REP_INFO,
        &[
            &INFO_BLOCK_SIZE.to_be_bytes(),
            &min.to_be_bytes(),
            &pref.to_be_bytes(),
            &max.to_be_bytes(),
        ],
    );
}

/// Appends an `NBD_REP_INFO` reply carrying a string (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn info_string(out: &mut Vec<u8>, opt: u32, ty: u16, s: &[u8]) {
    opt_reply(out, opt, REP_INFO, &[&ty.to_be_bytes(), truncate(s)]);
}

/// Appends an error reply with a human-readable message.
pub fn opt_error(out: &mut Vec<u8>, opt: u32, rep: u32, msg: &str) {
    opt_reply(out, opt, rep, &[truncate(msg.as_bytes())]);
}

/// A simple reply header (the data of a successful simple read follows it).
pub fn simple_reply(cookie: u64, errno: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(flags: u16, ty: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// Appends a complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn hole_chunk(out: &mut Vec<u8>, flags: u16, cookie: u64, offset: u64, len: u32) {
    out.extend_from_slice(&chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12));
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends the header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk (the data follows).
pub fn data_chunk_header(out: &mut Vec<u8>, flags: u16, cookie: u64, offset: u64, len: u32) {
    out.extend_from_slice(&chunk_header(
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        len + 8,
    ));
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends a complete `NBD_REPLY_TYPE_ERROR` chunk (always final).
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, errno: u32, msg: &str) {
    let m = truncate(msg.as_bytes());
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + m.len() as u32,
    ));
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(m.len() as u16).to_be_bytes());
    out.extend_from_slice(m);
}

/// Appends a complete final `NBD_REPLY_TYPE_NONE` chunk.
pub fn none_chunk(out: &mut Vec<u8>, cookie: u64) {
    out.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0));
}

/// Limits a string to what the protocol allows (and to a char boundary if it is UTF-8).
fn truncate(s: &[u8]) -> &[u8] {
    const MAX: usize = 1024; // well under MAX_STRING; messages are for humans
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while end > 0 && (s[end] & 0xc0) == 0x80 {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);

        let mut v = Vec::new();
        info_export(&mut v, OPT_GO, 1 << 30, 0x1234);
        assert_eq!(v.len(), 20 + 12);
        assert_eq!(u32::from_be_bytes(v[16..20].try_into().unwrap()), 12);
        assert_eq!(&v[20..22], &[0, 0]);

        let mut v = Vec::new();
        error_chunk(&mut v, 9, 22, "bad");
        assert_eq!(v.len(), 20 + 6 + 3);
        assert_eq!(u16::from_be_bytes([v[6], v[7]]), REPLY_TYPE_ERROR);
        assert_eq!(u32::from_be_bytes(v[16..20].try_into().unwrap()), 9);

        let long = "é".repeat(1000);
        let t = truncate(long.as_bytes());
        assert!(t.len() <= 1024);
        assert!(std::str::from_utf8(t).is_ok());
    }
}
