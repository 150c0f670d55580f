//! Export requests from metric families: a resource per replica, OTLP types per metric kind.

use std::collections::{BTreeMap, BTreeSet};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::metrics::{Family, Kind, Origin, Point, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaProcess {
    pub pid: u32,
    pub started_unix_ns: u64,
}

/// Builds export requests from families.
#[derive(Debug, Clone)]
pub struct OtlpEncoder {
    resource: Vec<(String, String)>,
    host_name: String,
    exporter_pid: u32,
    exporter_started_unix_ns: u64,
}

impl OtlpEncoder {
    pub fn new(
        resource: Vec<(String, String)>,
        host_name: String,
        exporter_pid: u32,
        exporter_started_unix_ns: u64,
    ) -> OtlpEncoder {
        OtlpEncoder {
            resource,
            host_name,
            exporter_pid,
            exporter_started_unix_ns,
        }
    }

    pub fn request(
        &self,
        families: &[Family],
        replicas: &BTreeMap<u32, ReplicaProcess>,
        now_unix_ns: u64,
    ) -> ExportMetricsServiceRequest {
        let owners: BTreeSet<Option<u32>> = families
            .iter()
            .flat_map(|family| family.points.iter().map(|point| point.replica))
            .collect();
        let resource_metrics = owners
            .into_iter()
            .map(|owner| {
                let process = owner.and_then(|replica| replicas.get(&replica));
                let metrics = families
                    .iter()
                    .filter_map(|family| {
                        let points: Vec<&Point> = family
                            .points
                            .iter()
                            .filter(|point| point.replica == owner)
                            .collect();
                        let start_unix_ns = match family.origin {
                            Origin::Exporter => self.exporter_started_unix_ns,
                            Origin::ReplicaProcess => process
                                .map_or(self.exporter_started_unix_ns, |process| {
                                    process.started_unix_ns
                                }),
                        };
                        (!points.is_empty())
                            .then(|| metric(family, &points, start_unix_ns, now_unix_ns))
                    })
                    .collect();
                ResourceMetrics {
                    resource: Some(Resource {
                        attributes: self.resource_attributes(owner, process),
                        ..Default::default()
                    }),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(InstrumentationScope {
                            name: "vsrscope".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..Default::default()
                        }),
                        metrics,
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            })
            .collect();
        ExportMetricsServiceRequest { resource_metrics }
    }

    fn resource_attributes(
        &self,
        replica: Option<u32>,
        process: Option<&ReplicaProcess>,
    ) -> Vec<KeyValue> {
        let mut attributes: Vec<(String, String)> = Vec::new();
        let service = match replica {
            Some(_) => self.resource[0].1.clone(),
            None => "vsrscope".to_string(),
        };
        attributes.push(("service.name".into(), service));
        // One instance per replica (and one for vsrscope): a user-given `service.instance.id` or
        // `host.name` would merge them, so vsrscope's own win.
        attributes.extend(
            self.resource[1..]
                .iter()
                .filter(|(key, _)| {
                    !matches!(
                        key.as_str(),
                        "service.instance.id" | "host.name" | "process.pid"
                    )
                })
                .cloned(),
        );
        let instance = match replica {
            Some(replica) => format!("{}/replica-{replica}", self.host_name),
            None => format!("{}/vsrscope-{}", self.host_name, self.exporter_pid),
        };
        attributes.push(("service.instance.id".into(), instance));
        attributes.push(("host.name".into(), self.host_name.clone()));
        let mut values: Vec<KeyValue> = attributes
            .into_iter()
            .map(|(key, value)| string_attribute(key, value))
            .collect();
        let pid = match replica {
            Some(_) => process.map(|process| process.pid),
            None => Some(self.exporter_pid),
        };
        if let Some(pid) = pid {
            values.push(KeyValue {
                key: "process.pid".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(i64::from(pid))),
                }),
                ..Default::default()
            });
        }
        values
    }
}

fn string_attribute(key: impl Into<String>, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// UCUM units, from the unit every seed name carries: as its last word (`_ms`, `_seconds`,
/// before a quantile's `_p99` or a counter's `_total`) or as its subject (`vsr_bytes_written`).
fn unit(name: &str) -> &'static str {
    let words: Vec<&str> = name.split('_').collect();
    let last = words
        .iter()
        .rev()
        .find(|word| !matches!(**word, "total" | "p50" | "p95" | "p99"))
        .copied()
        .unwrap_or_default();
    match last {
        "ms" => "ms",
        "seconds" => "s",
        "percent" => "%",
        "iops" => "{operation}/s",
        "sec" if name.contains("_bytes_per_sec") => "By/s",
        _ if words.contains(&"bytes") => "By",
        _ => "1",
    }
}

fn metric(family: &Family, points: &[&Point], start_unix_ns: u64, now_unix_ns: u64) -> Metric {
    let attributes = |point: &Point| -> Vec<KeyValue> {
        point
            .replica
            .map(|replica| string_attribute("replica_id", replica.to_string()))
            .into_iter()
            .chain(
                point
                    .labels
                    .iter()
                    .map(|(key, value)| string_attribute(*key, value.clone())),
            )
            .collect()
    };
    let number = |point: &Point, start_time_unix_nano: u64| NumberDataPoint {
        attributes: attributes(point),
        start_time_unix_nano,
        time_unix_nano: now_unix_ns,
        value: match &point.value {
            Value::Integer(value) => Some(number_data_point::Value::AsInt(
                i64::try_from(*value).unwrap_or(i64::MAX),
            )),
            Value::Real(value) => Some(number_data_point::Value::AsDouble(*value)),
            Value::Histogram(_) => None,
        },
        ..Default::default()
    };
    let data = match family.kind {
        Kind::Counter => metric::Data::Sum(Sum {
            data_points: points
                .iter()
                .map(|point| number(point, start_unix_ns))
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        }),
        Kind::Gauge => metric::Data::Gauge(Gauge {
            data_points: points.iter().map(|point| number(point, 0)).collect(),
        }),
        Kind::Histogram => metric::Data::Histogram(Histogram {
            data_points: points
                .iter()
                .filter_map(|point| match &point.value {
                    Value::Histogram(histogram) => Some(HistogramDataPoint {
                        attributes: attributes(point),
                        start_time_unix_nano: start_unix_ns,
                        time_unix_nano: now_unix_ns,
                        count: histogram.count,
                        sum: Some(histogram.sum_ms),
                        bucket_counts: histogram.buckets.clone(),
                        explicit_bounds: histogram.bounds_ms.clone(),
                        ..Default::default()
                    }),
                    _ => None,
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        }),
    };
    Metric {
        name: family.name.clone(),
        description: family.help.clone(),
        unit: unit(&family.name).into(),
        data: Some(data),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::HistogramPoint;

    fn families() -> Vec<Family> {
        let family = |name: &str, kind, origin, points| Family {
            name: name.into(),
            help: "help".into(),
            kind,
            origin,
            points,
        };
        vec![
            family(
                "vsr_client_latency_ms",
                Kind::Histogram,
                Origin::Exporter,
                vec![Point {
                    replica: Some(1),
                    labels: Vec::new(),
                    value: Value::Histogram(HistogramPoint {
                        bounds_ms: vec![0.5, 1.0],
                        buckets: vec![3, 4, 1],
                        sum_ms: 6.25,
                        count: 8,
                    }),
                }],
            ),
            family(
                "vsr_messages_sent_total",
                Kind::Counter,
                Origin::ReplicaProcess,
                vec![Point {
                    replica: Some(1),
                    labels: vec![("message_type", "prepare".into())],
                    value: Value::Integer(42),
                }],
            ),
            family(
                "vsr_view_number",
                Kind::Gauge,
                Origin::Exporter,
                vec![Point {
                    replica: Some(2),
                    labels: Vec::new(),
                    value: Value::Integer(7),
                }],
            ),
            family(
                "vsrscope_attached_sites",
                Kind::Gauge,
                Origin::Exporter,
                vec![Point {
                    replica: None,
                    labels: Vec::new(),
                    value: Value::Integer(30),
                }],
            ),
        ]
    }

    #[test]
    fn units_come_from_the_names() {
        for (name, expected) in [
            ("vsr_client_latency_ms", "ms"),
            ("vsr_client_latency_ms_p99", "ms"),
            ("vsrscope_program_run_seconds_total", "s"),
            ("vsr_network_bandwidth_bytes_per_sec", "By/s"),
            ("vsr_bytes_written_total", "By"),
            ("vsr_log_size_bytes", "By"),
            ("vsr_cpu_utilization_percent", "%"),
            ("vsr_disk_iops", "{operation}/s"),
            ("vsr_operations_total", "1"),
        ] {
            assert_eq!(unit(name), expected, "{name}");
        }
    }

    fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attributes
            .iter()
            .find(|attribute| attribute.key == key)
            .and_then(|attribute| attribute.value.as_ref())
            .and_then(|value| value.value.as_ref())
    }

    #[test]
    fn each_replica_is_a_resource_and_values_keep_their_meaning() {
        let encoder = OtlpEncoder::new(
            vec![("service.name".into(), "vsr-replica".into())],
            "host-a".into(),
            999,
            1_000,
        );
        let replicas = BTreeMap::from([(
            1,
            ReplicaProcess {
                pid: 4321,
                started_unix_ns: 500,
            },
        )]);
        let request = encoder.request(&families(), &replicas, 9_000);
        assert_eq!(
            request.resource_metrics.len(),
            3,
            "replicas 1, 2 and vsrscope"
        );
        let replica = &request.resource_metrics[1];
        let resource = &replica.resource.as_ref().unwrap().attributes;
        assert_eq!(
            attribute(resource, "service.instance.id"),
            Some(&any_value::Value::StringValue("host-a/replica-1".into()))
        );
        assert_eq!(
            attribute(resource, "process.pid"),
            Some(&any_value::Value::IntValue(4321))
        );
        let metrics = &replica.scope_metrics[0].metrics;
        let Some(metric::Data::Histogram(histogram)) = &metrics[0].data else {
            panic!("a histogram: {:?}", metrics[0]);
        };
        assert_eq!(metrics[0].unit, "ms");
        let point = &histogram.data_points[0];
        assert_eq!(
            histogram.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!((point.count, point.sum), (8, Some(6.25)));
        assert_eq!(point.bucket_counts, vec![3, 4, 1]);
        assert_eq!(point.explicit_bounds, vec![0.5, 1.0]);
        assert_eq!(
            point.start_time_unix_nano, 1_000,
            "kernel maps count from vsrscope's start"
        );
        let Some(metric::Data::Sum(sum)) = &metrics[1].data else {
            panic!("a sum: {:?}", metrics[1]);
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.data_points[0].start_time_unix_nano, 500,
            "the process's own tally"
        );
        assert_eq!(
            attribute(&sum.data_points[0].attributes, "message_type"),
            Some(&any_value::Value::StringValue("prepare".into()))
        );
        let own = &request.resource_metrics[0];
        assert_eq!(
            attribute(&own.resource.as_ref().unwrap().attributes, "service.name"),
            Some(&any_value::Value::StringValue("vsrscope".into()))
        );
        let Some(metric::Data::Gauge(gauge)) =
            &request.resource_metrics[2].scope_metrics[0].metrics[0].data
        else {
            panic!("a gauge");
        };
        assert_eq!(
            gauge.data_points[0].value,
            Some(number_data_point::Value::AsInt(7))
        );
    }
}
