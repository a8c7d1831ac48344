//! Traces: one OpenTelemetry span per request the coordinator answers,
//! continuing the caller's trace from the W3C `traceparent` header of its
//! NATS message, and handed back in the reply's headers, so an agent's span
//! and the coordinator's decision are one trace. A plan's steps go to their
//! executors in that trace too: each dispatch is a span, a child of the
//! decision on the plan's proposal ([`PlanTraces`]), whose context travels
//! in the dispatch's headers. Export goes over OTLP/HTTP when an endpoint is
//! configured (a batch processor on its own thread); without one, spans are
//! still made, and their context still travels.

use std::collections::{HashMap, VecDeque};

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::config::TelemetryConfig;

/// The trace context of a request, carried from its message to its reply.
pub type TraceContext = Context;

/// The coordinator's tracer and its exporter, if any.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    exporting: bool,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint `{endpoint}`: {detail}")]
pub struct TelemetryError {
    /// The configured endpoint.
    pub endpoint: String,
    /// What went wrong.
    pub detail: String,
}

impl Telemetry {
    /// A tracer for `cfg`: exporting if it names an endpoint.
    pub fn new(cfg: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        let service = cfg.service_name.clone().unwrap_or_else(|| "concord".into());
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .build();
        let mut builder = SdkTracerProvider::builder().with_resource(resource);
        let exporting = cfg.otlp_endpoint.is_some();
        if let Some(endpoint) = &cfg.otlp_endpoint {
            let url = if endpoint.ends_with("/v1/traces") {
                endpoint.clone()
            } else {
                format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            };
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(url)
                .build()
                .map_err(|e| TelemetryError {
                    endpoint: endpoint.clone(),
                    detail: e.to_string(),
                })?;
            builder = builder.with_batch_exporter(exporter);
        }
        let provider = builder.build();
        let tracer = provider.tracer("concord");
        Ok(Telemetry {
            provider,
            tracer,
            exporting,
        })
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Starts the span of one request, a child of the trace in `headers` if
    /// they carry one (else a new trace).
    pub fn request_span(&self, name: &'static str, headers: Option<&HeaderMap>, attrs: Vec<KeyValue>) -> TraceContext {
        let parent = extract(headers);
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        parent.with_span(span)
    }

    /// Starts the span of one dispatch to an executor, a child of the
    /// plan's decision if its context is known (else a new trace).
    pub fn dispatch_span(&self, plan: Option<&SpanContext>, attrs: Vec<KeyValue>) -> TraceContext {
        let parent = match plan {
            Some(sc) => Context::new().with_remote_span_context(sc.clone()),
            None => Context::new(),
        };
        let span = self
            .tracer
            .span_builder("concord.dispatch")
            .with_kind(SpanKind::Client)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        parent.with_span(span)
    }

    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(&self) {
        if self.exporting
            && let Err(e) = self.provider.shutdown()
        {
            tracing::warn!("telemetry: {e}");
        }
    }
}

/// Ends a request's span with these attributes, and returns headers that
/// carry its context to the reply's receiver.
pub fn finish(cx: &TraceContext, attrs: Vec<KeyValue>) -> HeaderMap {
    let span = cx.span();
    for kv in attrs {
        span.set_attribute(kv);
    }
    let headers = inject(cx);
    span.end();
    headers
}

/// Ends the span in `cx` with these attributes.
pub fn end(cx: &TraceContext, attrs: Vec<KeyValue>) {
    let span = cx.span();
    for kv in attrs {
        span.set_attribute(kv);
    }
    span.end();
}

/// How many plans' decision spans the coordinator keeps for their
/// dispatches (oldest forgotten first): far more than plans run at once.
pub const PLAN_TRACES_MAX: usize = 16_384;

/// The span that decided each recent plan's proposal, by (lineage,
/// version), so the plan's dispatches join its trace. Kept in memory only: a
/// plan forgotten here, or resumed by a restarted coordinator, dispatches in
/// a trace of its own.
#[derive(Debug, Default)]
pub struct PlanTraces {
    by_plan: HashMap<(String, u32), SpanContext>,
    order: VecDeque<(String, u32)>,
}

impl PlanTraces {
    /// Remembers the first decision span of a plan (a retried proposal's
    /// is a sibling in the same trace; the first one stays).
    pub fn remember(&mut self, lineage: &str, version: u32, cx: &TraceContext) {
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return;
        }
        let k = (lineage.to_string(), version);
        if self.by_plan.contains_key(&k) {
            return;
        }
        self.order.push_back(k.clone());
        self.by_plan.insert(k, sc);
        while self.order.len() > PLAN_TRACES_MAX {
            if let Some(old) = self.order.pop_front() {
                self.by_plan.remove(&old);
            }
        }
    }

    /// The decision span of a plan, if kept.
    pub fn get(&self, lineage: &str, version: u32) -> Option<&SpanContext> {
        self.by_plan.get(&(lineage.to_string(), version))
    }

    /// How many plans are kept.
    pub fn len(&self) -> usize {
        self.by_plan.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_plan.is_empty()
    }
}

/// The trace context in `headers` (W3C `traceparent`/`tracestate`), or none.
pub fn extract(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(h) => TraceContextPropagator::new().extract(&HeaderExtractor(h)),
        None => Context::new(),
    }
}

/// Headers carrying `cx` (W3C `traceparent`/`tracestate`).
pub fn inject(cx: &Context) -> HeaderMap {
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut fields);
    let mut h = HeaderMap::new();
    for (k, v) in fields {
        h.insert(k.as_str(), v.as_str());
    }
    h
}

/// The trace id in `headers`' `traceparent`, as 32 hex digits.
pub fn trace_id(headers: Option<&HeaderMap>) -> Option<String> {
    let cx = extract(headers);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}
