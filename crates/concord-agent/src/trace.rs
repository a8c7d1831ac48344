//! Trace context: the SDK's spans and the W3C `traceparent` they travel in
//! over NATS headers.
//!
//! Every call that asks the coordinator (`propose`), waits on it
//! (`await_decision`, `await_saga`) or serves it (an executor's dispatch) is
//! an OpenTelemetry span, made by the global tracer provider the application
//! installed (`opentelemetry::global::set_tracer_provider`), so it is
//! exported with the application's own spans. Without one (the no-op
//! provider) a local provider that exports nothing makes it instead: the
//! span still has an id of its own, and the context the SDK sends names it.
//! Each also has a `tracing` span carrying its `trace_id` and `span_id`.

use std::collections::HashMap;
use std::sync::OnceLock;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanBuilder, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// The instrumentation scope of the SDK's spans.
const SCOPE: &str = "concord-agent";

/// The tracer used when the application installed none.
fn local() -> &'static SdkTracer {
    static LOCAL: OnceLock<SdkTracer> = OnceLock::new();
    LOCAL.get_or_init(|| SdkTracerProvider::builder().build().tracer(SCOPE))
}

/// Starts span `name` as a child of `parent` (a new trace if `parent`
/// holds no span) and returns the context holding it.
pub(crate) fn start(name: &'static str, kind: SpanKind, parent: &Context, attrs: Vec<KeyValue>) -> Context {
    let builder = || {
        SpanBuilder::from_name(name)
            .with_kind(kind.clone())
            .with_attributes(attrs.clone())
    };
    let span = global::tracer(SCOPE).build_with_context(builder(), parent);
    let made = span.span_context();
    // The no-op provider hands back the parent's context (or an invalid
    // one): no span of its own.
    if made.is_valid() && made.span_id() != parent.span().span_context().span_id() {
        return parent.with_span(span);
    }
    parent.with_span(local().build_with_context(builder(), parent))
}

/// Ends the span in `cx` with these attributes.
pub(crate) fn end(cx: &Context, attrs: Vec<KeyValue>) {
    let span = cx.span();
    for kv in attrs {
        span.set_attribute(kv);
    }
    span.end();
}

/// The caller's current OpenTelemetry context.
pub(crate) fn current() -> Context {
    Context::current()
}

/// The context a W3C `traceparent` names (none if it does not parse).
pub(crate) fn parse(traceparent: &str) -> Context {
    let fields = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    TraceContextPropagator::new().extract(&fields)
}

/// The context in NATS `headers` (W3C `traceparent`/`tracestate`), or none.
pub(crate) fn extract(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(h) => TraceContextPropagator::new().extract(&HeaderExtractor(h)),
        None => Context::new(),
    }
}

/// NATS headers carrying `cx`.
pub(crate) fn inject(cx: &Context) -> HeaderMap {
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut fields);
    let mut h = HeaderMap::new();
    for (k, v) in fields {
        h.insert(k.as_str(), v.as_str());
    }
    h
}

/// The span in `cx` as a W3C `traceparent`, if it has one.
pub(crate) fn traceparent(cx: &Context) -> Option<String> {
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// The trace and span ids of the span in `cx`, for `tracing` fields.
pub(crate) fn ids(cx: &Context) -> (String, String) {
    let sc = cx.span().span_context().clone();
    (sc.trace_id().to_string(), sc.span_id().to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_is_its_own_child_of_the_traceparent_it_continues() {
        let theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = start("concord.test", SpanKind::Client, &parse(theirs), Vec::new());
        let mine = traceparent(&cx).expect("a valid span");
        let parts: Vec<&str> = mine.split('-').collect();
        assert_eq!(parts[1], "0af7651916cd43dd8448eb211c80319c");
        assert_ne!(parts[2], "b7ad6b7169203331");
        assert_eq!(parts[3], "01");
        // Headers carry it as it is.
        let back = extract(Some(&inject(&cx)));
        assert_eq!(traceparent(&back).as_deref(), Some(mine.as_str()));
        // No parent: a new trace.
        let root = start("concord.test", SpanKind::Client, &Context::new(), Vec::new());
        let (trace_id, _) = ids(&root);
        assert_ne!(trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_ne!(trace_id, "00000000000000000000000000000000");
        end(&root, Vec::new());
    }
}
