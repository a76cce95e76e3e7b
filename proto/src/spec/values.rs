//! Scalar values of the spec that are written as strings: durations with a
//! unit, addresses, networks, counts with a k/m suffix, status ranges. Each
//! parses with an error that quotes the value and shows the expected form, and
//! serialises back to the same form.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Implements serde for a type through its `FromStr` and `Display`, so every
/// value type reads and writes the operator's notation. Numbers written
/// without quotes are accepted where a value may be a bare number.
macro_rules! serde_via_str {
    ($ty:ty, $expecting:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<$ty, E> {
                        self.visit_str(&v.to_string())
                    }
                    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<$ty, E> {
                        self.visit_str(&v.to_string())
                    }
                    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<$ty, E> {
                        self.visit_str(&v.to_string())
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

/// A duration written with a unit: `250ms`, `5s`, `10m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Duration(std::time::Duration);

impl Duration {
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }
    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub fn get(self) -> std::time::Duration {
        self.0
    }
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let bad = || format!("{s:?} is not a duration: write a whole number with a unit (ms, s, m, h), like \"500ms\" or \"5s\"");
        if digits.is_empty() {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let ms_per_unit = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "" => return Err(format!("{s:?} has no unit: write it with ms, s, m or h, like \"{n}ms\" or \"{n}s\"")),
            _ => return Err(bad()),
        };
        n.checked_mul(ms_per_unit).map(Duration::from_millis).ok_or_else(|| format!("{s:?} is too long a duration"))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0 => write!(f, "0s"),
            _ if ms.is_multiple_of(3_600_000) => write!(f, "{}h", ms / 3_600_000),
            _ if ms.is_multiple_of(60_000) => write!(f, "{}m", ms / 60_000),
            _ if ms.is_multiple_of(1_000) => write!(f, "{}s", ms / 1_000),
            _ => write!(f, "{ms}ms"),
        }
    }
}

serde_via_str!(Duration, "a duration with a unit, like \"5s\"");

/// A count that may carry a `k` (thousand) or `m` (million) suffix: `90000`, `90k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Count(pub u64);

impl FromStr for Count {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (digits, factor) = match t.as_bytes().last() {
            Some(b'k' | b'K') => (&t[..t.len() - 1], 1_000),
            Some(b'm' | b'M') => (&t[..t.len() - 1], 1_000_000),
            _ => (t, 1),
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(factor))
            .map(Count)
            .ok_or_else(|| format!("{s:?} is not a count: write a whole number, optionally with k or m, like 30000 or \"30k\""))
    }
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Count {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a count, like 30000 or \"30k\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Count, E> {
                u64::try_from(v).map(Count).map_err(|_| E::custom(format!("{v} is negative: a count is 0 or more")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Count, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// An IP address and port: `192.0.2.10:80`, `[2001:db8::1]:80`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr(pub SocketAddr);

impl FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse()
            .map(Addr)
            .map_err(|_| format!("{s:?} is not an IP address and port: write it like \"192.0.2.10:80\" or \"[2001:db8::1]:80\""))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.fmt(f)
    }
}

serde_via_str!(Addr, "an IP address and port, like \"192.0.2.10:80\"");

/// An address with its prefix length: `192.0.2.100/24`, `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(pub ipnet::IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse()
            .map(Cidr)
            .map_err(|_| format!("{s:?} is not an address with a prefix length: write it like \"192.0.2.0/24\" or \"2001:db8::/32\""))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.fmt(f)
    }
}

serde_via_str!(Cidr, "an address with a prefix length, like \"192.0.2.0/24\"");

/// An inclusive range of HTTP status codes: `200`, `200-399`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusRange {
    pub low: u16,
    pub high: u16,
}

impl StatusRange {
    pub fn contains(&self, status: u16) -> bool {
        (self.low..=self.high).contains(&status)
    }
}

impl FromStr for StatusRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a status range: write a code from 100 to 599, or a range like \"200-399\"");
        let code = |t: &str| t.trim().parse::<u16>().ok().filter(|c| (100..=599).contains(c)).ok_or_else(bad);
        let (low, high) = match s.split_once('-') {
            Some((a, b)) => (code(a)?, code(b)?),
            None => (code(s)?, code(s)?),
        };
        if low > high {
            return Err(format!("{s:?} is an empty status range: write the low code first, like \"200-399\""));
        }
        Ok(StatusRange { low, high })
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

serde_via_str!(StatusRange, "a status code or range, like \"200-399\"");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_and_write_with_their_unit() {
        for (text, ms) in [("250ms", 250), ("5s", 5_000), ("4500ms", 4_500), ("10m", 600_000), ("2h", 7_200_000)] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.get().as_millis(), ms, "{text}");
            assert_eq!(d.to_string(), text);
        }
    }

    #[test]
    fn a_duration_without_unit_names_the_value_and_the_fix() {
        let err = "5".parse::<Duration>().unwrap_err();
        assert!(err.contains("\"5\" has no unit"), "{err}");
        let err = "5 minutes".parse::<Duration>().unwrap_err();
        assert!(err.contains("\"5 minutes\" is not a duration"), "{err}");
    }

    #[test]
    fn counts_take_k_and_m_suffixes() {
        assert_eq!("90k".parse::<Count>().unwrap(), Count(90_000));
        assert_eq!("2m".parse::<Count>().unwrap(), Count(2_000_000));
        assert_eq!("1200".parse::<Count>().unwrap(), Count(1_200));
        assert!("lots".parse::<Count>().unwrap_err().contains("\"lots\""));
    }

    #[test]
    fn addresses_reject_an_octet_out_of_range() {
        let err = "10.0.0.300:80".parse::<Addr>().unwrap_err();
        assert!(err.starts_with("\"10.0.0.300:80\" is not an IP address and port"), "{err}");
        assert!("[2001:db8::1]:80".parse::<Addr>().is_ok());
    }

    #[test]
    fn status_ranges_hold_their_bounds() {
        let r: StatusRange = "200-399".parse().unwrap();
        assert!(r.contains(200) && r.contains(399) && !r.contains(400));
        assert!("399-200".parse::<StatusRange>().is_err());
        assert!("700".parse::<StatusRange>().is_err());
    }
}
