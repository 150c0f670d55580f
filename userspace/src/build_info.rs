//! `vsrscope_build_info`: which vsrscope is answering, in the form Prometheus exporters use.

use crate::metrics::{Family, Kind, Origin, Point, Value};

/// A gauge of 1 whose labels carry the version and the commit built from.
pub fn family() -> Family {
    Family {
        name: "vsrscope_build_info".into(),
        help: "vsrscope's version and the commit it was built from (unknown outside a git checkout); always 1.".into(),
        kind: Kind::Gauge,
        origin: Origin::Exporter,
        points: vec![Point {
            replica: None,
            labels: vec![
                ("version", env!("CARGO_PKG_VERSION").into()),
                ("revision", env!("VSRSCOPE_REVISION").into()),
            ],
            value: Value::Integer(1),
        }],
    }
}
