//! Host networking: what vaned changes on the host around the tunnel,
//! each concern as a pure part that says what should be and a thin shell
//! that makes it so.
//!
//! - [`routing`]: the full tunnel's policy routing rules and routes, as
//!   data (pure).
//! - [`rtnl`]: the few rtnetlink requests that carry them out (links,
//!   addresses, routes, rules).
//! - [`killswitch`]: the nftables kill switch, its ruleset built as data
//!   and loaded in one transaction.

pub mod killswitch;
pub mod routing;
pub mod rtnl;
