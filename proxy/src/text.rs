//! Numbers and addresses written into a `String` without `core::fmt`.
//!
//! Access log lines and span attributes are formatted for every request. Through `write!`
//! (`Display`), a JSON log line cost ~8,800 instructions, mostly in the formatting machinery
//! (padding, precision and width handling for each number and each IPv4 octet; callgrind),
//! about a fifth of a whole proxied request. These write the same text directly.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// `n` in decimal.
pub fn push_u64(out: &mut String, n: u64) {
    push_padded(out, n, 1);
}

/// `n` in decimal, left-padded with zeros to `width` digits (at most 20).
///
/// Two digits per division through a table, and pushed as `char`s: an access log line has a
/// dozen numbers, most of them one to four digits, where the generic path (a digit per
/// division, then a UTF-8 check of the digits) was a fifth of the line's cost.
pub fn push_padded(out: &mut String, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = digits.len();
    let mut n = n;
    while n >= 100 {
        let pair = usize::try_from(n % 100).unwrap_or(0) * 2;
        n /= 100;
        i -= 2;
        digits[i] = PAIRS[pair];
        digits[i + 1] = PAIRS[pair + 1];
    }
    if n >= 10 {
        let pair = usize::try_from(n).unwrap_or(0) * 2;
        i -= 2;
        digits[i] = PAIRS[pair];
        digits[i + 1] = PAIRS[pair + 1];
    } else {
        i -= 1;
        digits[i] = b'0' + n as u8;
    }
    let start = i.min(digits.len().saturating_sub(width));
    push_ascii(out, &digits[start..]);
}

/// "00" to "99", two bytes each.
const PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// An address as `Display` writes it: IPv4 by hand, IPv6 (rare here) through `Display`.
pub fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// `ip:port`, or `[ip]:port` for IPv6, as `Display` writes it.
pub fn push_socket_addr(out: &mut String, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(_) => push_ip(out, addr.ip()),
        SocketAddr::V6(v6) => {
            if v6.flowinfo() != 0 || v6.scope_id() != 0 {
                use std::fmt::Write as _;
                let _ = write!(out, "{addr}");
                return;
            }
            out.push('[');
            push_ip(out, addr.ip());
            out.push(']');
        }
    }
    out.push(':');
    push_u64(out, u64::from(addr.port()));
}

/// Milliseconds with three decimals (microsecond precision, rounded): `68.162`.
pub fn push_millis(out: &mut String, d: Duration) {
    let micros = (d.as_nanos() + 500) / 1000;
    push_u64(out, u64::try_from(micros / 1000).unwrap_or(u64::MAX));
    out.push('.');
    push_padded(out, (micros % 1000) as u64, 3);
}

/// 32 lowercase hex digits (a trace id).
pub fn push_hex_u128(out: &mut String, n: u128) {
    let mut hex = [0u8; 32];
    hex_into(&mut hex, &n.to_be_bytes());
    // 32 bytes: here one validation pass is cheaper than 32 `char` pushes.
    out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
}

/// `bytes` as lowercase hex into `out` (two digits per byte; `out` holds at least that).
pub fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
}

/// The two lowercase hex digits of every byte: one load and one two-byte store per byte
/// (a trace id and a span id are written into every traced request's `traceparent`).
static HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut b = 0;
    while b < 256 {
        pairs[b] = [DIGITS[b >> 4], DIGITS[b & 0x0f]];
        b += 1;
    }
    pairs
};

fn push_ascii(out: &mut String, ascii: &[u8]) {
    // Only ASCII digits and hex digits reach here. A `char` push of an ASCII byte is a
    // length check and a store, cheaper for these short runs than `str::from_utf8`.
    out.reserve(ascii.len());
    for &b in ascii {
        out.push(char::from(b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_two_lowercase_digits_per_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        let mut out = vec![0u8; 512];
        hex_into(&mut out, &bytes);
        let want: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(std::str::from_utf8(&out).unwrap(), want);
        let mut s = String::new();
        push_hex_u128(&mut s, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(s, "0123456789abcdeffedcba9876543210");
    }

    #[test]
    fn everything_matches_display() {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut numbers = vec![0, 1, 9, 10, 99, 100, 65_535, u64::MAX];
        numbers.extend((0..300).map(|_| rng.u64(..) >> rng.u32(0..64)));
        for n in numbers {
            let mut s = String::new();
            push_u64(&mut s, n);
            assert_eq!(s, n.to_string());
            for width in [2, 3, 4] {
                let mut s = String::new();
                push_padded(&mut s, n, width);
                assert_eq!(s, format!("{n:0width$}"));
            }
            let mut s = String::new();
            let wide = u128::from(n) << 64 | u128::from(n.rotate_left(7));
            push_hex_u128(&mut s, wide);
            assert_eq!(s, format!("{wide:032x}"));
        }
        let mut addrs: Vec<SocketAddr> = (0..300)
            .map(|_| SocketAddr::from((rng.u32(..).to_be_bytes(), rng.u16(..))))
            .collect();
        addrs.extend(
            [
                "0.0.0.0:0",
                "255.255.255.255:65535",
                "[::1]:80",
                "[2001:db8::1]:8080",
                "[fe80::1%2]:443",
            ]
            .map(|a| a.parse::<SocketAddr>().unwrap()),
        );
        for addr in addrs {
            let mut s = String::new();
            push_socket_addr(&mut s, addr);
            assert_eq!(s, addr.to_string());
            let mut s = String::new();
            push_ip(&mut s, addr.ip());
            assert_eq!(s, addr.ip().to_string());
        }
    }

    #[test]
    fn millis_have_three_decimals() {
        for (nanos, want) in [
            (0, "0.000"),
            (1_500_000, "1.500"),
            (68_162_345, "68.162"),
            (68_162_500, "68.163"),
            (999_999_600, "1000.000"),
            (12_000_000_000, "12000.000"),
        ] {
            let mut s = String::new();
            push_millis(&mut s, Duration::from_nanos(nanos));
            assert_eq!(s, want, "{nanos}");
        }
    }
}
