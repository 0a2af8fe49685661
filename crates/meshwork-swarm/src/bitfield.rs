//! A fixed-length set of piece indices, packed for the wire (most significant bit first, as
//! BitTorrent's bitfield message).

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Bitfield {
    bits: Vec<u8>,
    len: usize,
    count: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bitfield of {got} bytes for {len} pieces (expected {expected} bytes, spare bits zero)")]
pub struct BitfieldError {
    pub len: usize,
    pub expected: usize,
    pub got: usize,
}

impl Bitfield {
    pub fn new(len: usize) -> Bitfield {
        Bitfield {
            bits: vec![0; len.div_ceil(8)],
            len,
            count: 0,
        }
    }

    pub fn full(len: usize) -> Bitfield {
        let mut b = Bitfield::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many bits are set.
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.bits[i / 8] & (0x80 >> (i % 8)) != 0
    }

    /// Sets bit `i`; returns whether it was newly set. Out of range is a no-op.
    pub fn set(&mut self, i: usize) -> bool {
        if i >= self.len || self.get(i) {
            return false;
        }
        self.bits[i / 8] |= 0x80 >> (i % 8);
        self.count += 1;
        true
    }

    /// Clears bit `i`; returns whether it was set. Out of range is a no-op.
    pub fn clear(&mut self, i: usize) -> bool {
        if !self.get(i) {
            return false;
        }
        self.bits[i / 8] &= !(0x80 >> (i % 8));
        self.count -= 1;
        true
    }

    pub fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len).filter(|i| self.get(*i))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Parses a peer's bitfield for `len` pieces: exact length, spare bits zero.
    pub fn from_bytes(bytes: &[u8], len: usize) -> Result<Bitfield, BitfieldError> {
        let expected = len.div_ceil(8);
        let spare_clear =
            len.is_multiple_of(8) || bytes.last().is_none_or(|b| b & (0xffu8 >> (len % 8)) == 0);
        if bytes.len() != expected || !spare_clear {
            return Err(BitfieldError {
                len,
                expected,
                got: bytes.len(),
            });
        }
        let count = bytes.iter().map(|b| b.count_ones() as usize).sum();
        Ok(Bitfield {
            bits: bytes.to_vec(),
            len,
            count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_spare_bits() {
        let mut b = Bitfield::new(11);
        assert!(b.set(0) && b.set(10) && !b.set(10) && !b.set(11));
        assert_eq!(b.count(), 2);
        let back = Bitfield::from_bytes(b.as_bytes(), 11).unwrap();
        assert_eq!(back, b);
        assert!(Bitfield::from_bytes(&[0, 0b0001_0000], 11).is_err());
        assert!(Bitfield::from_bytes(&[0], 11).is_err());
        assert!(Bitfield::full(9).is_full());
    }
}
