//! Port ranges as LPM prefixes over the 16 port bits of a policy key.

/// The minimal set of `(value, bits)` prefixes covering `first..=last`: at most 30 for any
/// range of 16-bit ports. `bits` is how many leading port bits are fixed (0 = every port).
pub fn cover(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // The largest aligned block starting at lo that does not pass hi.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros().min(16)
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let bits = 16 - size.trailing_zeros() as u8;
        out.push((lo as u16, bits));
        lo += size;
    }
    out
}

/// Whether prefix `(value, bits)` contains `port`.
pub fn contains(value: u16, bits: u8, port: u16) -> bool {
    bits == 0 || (value ^ port) >> (16 - u32::from(bits)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_covers() {
        assert_eq!(cover(80, 80), vec![(80, 16)]);
        assert_eq!(cover(0, 65535), vec![(0, 0)]);
        assert_eq!(cover(1, 65535).len(), 16);
        assert_eq!(cover(1, 65534).len(), 30);
        assert_eq!(cover(8080, 8083), vec![(8080, 14)]);
    }

    proptest! {
        #[test]
        fn cover_is_exact_and_small(a: u16, b: u16, probe: u16) {
            let (first, last) = (a.min(b), a.max(b));
            let c = cover(first, last);
            prop_assert!(c.len() <= 30);
            let hits = c.iter().filter(|(v, bits)| contains(*v, *bits, probe)).count();
            prop_assert_eq!(hits, usize::from((first..=last).contains(&probe)));
        }
    }
}
