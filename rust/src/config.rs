//! Configuration that reads like `/sys/kernel/mm/transparent_hugepage/`.

use crate::error::{Error, Result};
use crate::{PAGE_SHIFT, PMD_ORDER};

/// `transparent_hugepage/enabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enabled {
    Always,
    Madvise,
    Never,
}

impl Enabled {
    pub fn parse(s: &str) -> Result<Enabled> {
        match s {
            "always" => Ok(Enabled::Always),
            "madvise" => Ok(Enabled::Madvise),
            "never" => Ok(Enabled::Never),
            _ => Err(Error::Config(format!("unknown THP mode {s:?} (want always, madvise or never)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Enabled::Always => "always",
            Enabled::Madvise => "madvise",
            Enabled::Never => "never",
        }
    }
}

/// `transparent_hugepage/hugepages-<size>kB/enabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeMode {
    Always,
    Inherit,
    Madvise,
    Never,
}

impl SizeMode {
    pub fn parse(s: &str) -> Result<SizeMode> {
        match s {
            "always" => Ok(SizeMode::Always),
            "inherit" => Ok(SizeMode::Inherit),
            "madvise" => Ok(SizeMode::Madvise),
            "never" => Ok(SizeMode::Never),
            _ => Err(Error::Config(format!("unknown size mode {s:?} (want always, inherit, madvise or never)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SizeMode::Always => "always",
            SizeMode::Inherit => "inherit",
            SizeMode::Madvise => "madvise",
            SizeMode::Never => "never",
        }
    }
}

/// Which order-selection and race-handling the fault path uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The mTHP fault path merged in v6.8 and shipped in 6.18.
    Upstream,
    /// The seed patch (v1, June 2023): every order from the largest down to 2,
    /// re-check under the PTL and retry one order lower after a lost race.
    V1,
    /// The reviewers' alternative: the preferred (largest enabled) order if
    /// its range fits and is empty, else order 0.
    Preferred,
}

impl Policy {
    pub fn parse(s: &str) -> Result<Policy> {
        match s {
            "upstream" => Ok(Policy::Upstream),
            "v1" => Ok(Policy::V1),
            "preferred" => Ok(Policy::Preferred),
            _ => Err(Error::Config(format!("unknown policy {s:?} (want upstream, v1 or preferred)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Policy::Upstream => "upstream",
            Policy::V1 => "v1",
            Policy::Preferred => "preferred",
        }
    }
}

/// What a fault does when the re-check under the PTL finds that another CPU
/// populated part of its range first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRace {
    /// Drop the folio and return; the access faults again if its PTE is
    /// still none (upstream, and Yang Shi's "just exit ... like the order-0").
    Refault,
    /// If the faulting PTE is still none, drop the folio and retry one order
    /// lower inside the same fault (the seed patch v1).
    RetryLower,
}

impl OnRace {
    pub fn parse(s: &str) -> Result<OnRace> {
        match s {
            "refault" => Ok(OnRace::Refault),
            "retry-lower" => Ok(OnRace::RetryLower),
            _ => Err(Error::Config(format!("unknown race handling {s:?} (want refault or retry-lower)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            OnRace::Refault => "refault",
            OnRace::RetryLower => "retry-lower",
        }
    }
}

impl Policy {
    /// The race handling each policy was proposed with.
    pub fn default_on_race(self) -> OnRace {
        match self {
            Policy::V1 => OnRace::RetryLower,
            Policy::Upstream | Policy::Preferred => OnRace::Refault,
        }
    }
}

/// The sysfs name of an order's folder: `hugepages-64kB` -> "64kB".
pub fn size_name(order: usize) -> String {
    format!("{}kB", (1u64 << (order as u32 + PAGE_SHIFT)) >> 10)
}

/// How byte counts may be written, for error messages.
pub const BYTES_SUFFIXES: &str =
    "a number with an optional suffix K, KB, KiB, M, MB, MiB, G, GB, GiB, T, TB or TiB, in any case; all powers of 1024";

/// Parses a byte count: a plain number or one with a binary suffix
/// (`64K`, `64KiB`, `2M`, `2MiB`, `1G`, `1g`, `1GB`, `1T`, also `kB`).
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != 'x' && c != 'X').unwrap_or(t.len());
    let (n, suf) = if t.starts_with("0x") || t.starts_with("0X") { (t, "") } else { t.split_at(split) };
    let base = crate::trace::parse_number(n).ok_or_else(|| Error::Config(format!("malformed size {s:?}")))?;
    // Every suffix is a power of 1024 (as sysfs's "kB" is), in any case, so
    // that "1g", "1G", "1GB" and "1GiB" are all the same and none surprises.
    let shift = match suf.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(Error::Config(format!("malformed size {s:?} ({BYTES_SUFFIXES})"))),
    };
    base.checked_mul(1u64 << shift).ok_or_else(|| Error::Config(format!("size {s:?} is too large")))
}

/// Parses a THP size as sysfs names it (`64kB`) or with a suffix (`64K`, `2M`)
/// and returns its order. Only sizes that have a `hugepages-*` folder on
/// x86-64 (8kB..2048kB) are accepted.
pub fn parse_thp_size(s: &str) -> Result<usize> {
    let bytes = parse_bytes(s).map_err(|_| Error::Config(format!("unknown THP size {s:?}")))?;
    for order in 1..=PMD_ORDER {
        if bytes == 1u64 << (order as u32 + PAGE_SHIFT) {
            return Ok(order);
        }
    }
    Err(Error::Config(format!("unknown THP size {s:?} (sizes: 8kB, 16kB, ..., 2048kB)")))
}

/// Where physical memory comes from and how it fails.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryConfig {
    /// Simulated physical memory. Host memory is only used as pages are.
    pub phys_bytes: u64,
    /// memcg `memory.max`; `None` is unlimited.
    pub memcg_limit_bytes: Option<u64>,
    /// Fragmentation to inject: the fraction (0..1) of free pageblocks that
    /// get an unmovable page pinned in them before the run, so that orders
    /// above the pinned granularity become scarce.
    pub fragmentation: f64,
    /// Orders at which every allocation fails (a bit per order), to force
    /// the fallback path.
    pub fail_orders: u32,
    /// Probability that any allocation above order 0 fails.
    pub fail_rate: f64,
    /// Seed for the failure injection.
    pub seed: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            phys_bytes: 4 << 40,
            memcg_limit_bytes: None,
            fragmentation: 0.0,
            fail_orders: 0,
            fail_rate: 0.0,
            seed: 0,
        }
    }
}

/// Everything that decides what a fault does.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `transparent_hugepage/enabled`.
    pub enabled: Enabled,
    /// `hugepages-*/enabled`, indexed by order (0 and 1 are never used for anon).
    pub sizes: [SizeMode; PMD_ORDER + 1],
    /// `transparent_hugepage/use_zero_page`.
    pub use_zero_page: bool,
    pub policy: Policy,
    /// Race handling; `None` is the policy's own.
    pub on_race: Option<OnRace>,
    /// Deterministic mode: the probability of switching to another CPU at
    /// each point where the fault path can be overtaken. Higher widens the
    /// race windows; 0 runs each CPU until it blocks or finishes.
    pub preempt: f64,
    pub memory: MemoryConfig,
    /// Check the invariants (mapcounts, conservation of pages) after a run.
    pub check_invariants: bool,
}

impl Default for Config {
    /// This machine's kernel defaults: `enabled=madvise`, 2048kB `inherit`,
    /// every other size `never`.
    fn default() -> Self {
        let mut sizes = [SizeMode::Never; PMD_ORDER + 1];
        sizes[PMD_ORDER] = SizeMode::Inherit;
        Config {
            enabled: Enabled::Madvise,
            sizes,
            use_zero_page: true,
            policy: Policy::Upstream,
            on_race: None,
            preempt: 0.5,
            memory: MemoryConfig::default(),
            check_invariants: false,
        }
    }
}

impl Config {
    /// The race handling in force.
    pub fn on_race(&self) -> OnRace {
        self.on_race.unwrap_or(self.policy.default_on_race())
    }

    /// Applies `SIZE=MODE` as `--thp` takes it.
    pub fn set_size_mode(&mut self, spec: &str) -> Result<()> {
        let (size, mode) = spec.split_once('=').ok_or_else(|| {
            Error::Config(format!("malformed --thp {spec:?} (want SIZE=always|inherit|madvise|never)"))
        })?;
        let order = parse_thp_size(size)?;
        self.sizes[order] = SizeMode::parse(mode)?;
        Ok(())
    }

    /// The anon orders allowed for a VMA, as `thp_vma_allowable_orders()`
    /// computes them for a page fault, as a bitmask. `hugepage`/`nohugepage`
    /// are VM_HUGEPAGE / VM_NOHUGEPAGE.
    pub fn allowable_orders(&self, hugepage: bool, nohugepage: bool) -> u32 {
        if nohugepage {
            return 0;
        }
        let global_always = self.enabled == Enabled::Always;
        let global_enabled = self.enabled != Enabled::Never;
        let mut mask = 0u32;
        for (order, mode) in self.sizes.iter().enumerate() {
            let on = match mode {
                SizeMode::Always => true,
                SizeMode::Madvise => hugepage,
                SizeMode::Inherit => global_always || (hugepage && global_enabled),
                SizeMode::Never => false,
            };
            if on {
                mask |= 1 << order;
            }
        }
        mask & THP_ORDERS_ALL_ANON
    }
}

/// Orders 2..=PMD_ORDER: order 1 is a limitation of the THP implementation.
pub const THP_ORDERS_ALL_ANON: u32 = ((1 << (PMD_ORDER + 1)) - 1) & !0b11;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_orders() {
        assert_eq!(parse_thp_size("64kB").unwrap(), 4);
        assert_eq!(parse_thp_size("64K").unwrap(), 4);
        assert_eq!(parse_thp_size("2M").unwrap(), 9);
        assert_eq!(parse_thp_size("2048kB").unwrap(), 9);
        assert!(parse_thp_size("48kB").is_err());
        assert!(parse_thp_size("4kB").is_err());
        assert_eq!(parse_bytes("64GiB").unwrap(), 64 << 30);
        assert_eq!(parse_bytes("1T").unwrap(), 1 << 40);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("12Q").is_err());
        // Every spelling of a suffix is the same power of 1024.
        for t in ["1G", "1g", "1GB", "1gb", "1GiB", "1gib"] {
            assert_eq!(parse_bytes(t).unwrap(), 1 << 30, "{t}");
        }
        let e = parse_bytes("1Gi").unwrap_err().to_string();
        assert!(e.contains("GiB") && e.contains("any case"), "{e}");
        assert_eq!(size_name(4), "64kB");
    }

    #[test]
    fn allowable_orders_follow_the_knobs() {
        let mut c = Config::default();
        assert_eq!(c.allowable_orders(false, false), 0);
        assert_eq!(c.allowable_orders(true, false), 1 << 9);
        c.enabled = Enabled::Never;
        c.set_size_mode("64kB=always").unwrap();
        // A per-size `always` works even with the top level at never.
        assert_eq!(c.allowable_orders(false, false), 1 << 4);
        assert_eq!(c.allowable_orders(true, true), 0);
        c.set_size_mode("8kB=always").unwrap();
        assert_eq!(c.allowable_orders(false, false), 1 << 4, "order 1 is never used for anon");
    }
}
