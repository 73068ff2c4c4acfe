//! Awaiting what the library logs: for tests whose only observable event
//! is a warning (an attempt that found the service unreachable, say).

use std::sync::Mutex;

use tokio::sync::oneshot;
use tracing::field::{Field, Visit};
use tracing::subscriber::DefaultGuard;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Resolves the returned receiver at the first warning, logged on this
/// thread while the guard lives, whose message contains `text`. Use a
/// current-thread runtime, so that the futures under test run on this
/// thread.
pub fn on_warning(text: &'static str) -> (DefaultGuard, oneshot::Receiver<()>) {
    let (seen, receiver) = oneshot::channel();
    let layer = SignalOnWarning {
        text,
        seen: Mutex::new(Some(seen)),
    };
    let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    (guard, receiver)
}

struct SignalOnWarning {
    text: &'static str,
    seen: Mutex<Option<oneshot::Sender<()>>>,
}

impl<S: Subscriber> Layer<S> for SignalOnWarning {
    fn on_event(&self, event: &Event<'_>, _context: Context<'_, S>) {
        if *event.metadata().level() != Level::WARN {
            return;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        if message.0.contains(self.text) {
            let sender = self.seen.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(sender) = sender {
                let _ = sender.send(());
            }
        }
    }
}

/// The `message` field of an event.
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
