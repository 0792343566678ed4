//! Lower-case hexadecimal, the spelling of hashes in the API, manifests and bundles.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Displays bytes as lowercase hex, for writing them without an intermediate string.
pub struct Hex<'a>(pub &'a [u8]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for chunk in self.0.chunks(32) {
            let mut buf = [0u8; 64];
            for (i, b) in chunk.iter().enumerate() {
                buf[2 * i] = DIGITS[usize::from(b >> 4)];
                buf[2 * i + 1] = DIGITS[usize::from(b & 15)];
            }
            f.write_str(std::str::from_utf8(&buf[..2 * chunk.len()]).expect("hex is ASCII"))?;
        }
        Ok(())
    }
}

pub fn encode(bytes: &[u8]) -> String {
    Hex(bytes).to_string()
}

/// The bytes `s` spells, upper or lower case; `None` for an odd length or a non-hex digit.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_and_refuses_what_is_not_hex() {
        let bytes = [0u8, 1, 0x7f, 0x80, 0xab, 0xff];
        assert_eq!(super::encode(&bytes), "00017f80abff");
        assert_eq!(super::decode("00017f80ABff").unwrap(), bytes);
        assert_eq!(super::decode("abc"), None);
        assert_eq!(super::decode("zz"), None);
        assert_eq!(super::decode("").unwrap(), Vec::<u8>::new());
    }
}
