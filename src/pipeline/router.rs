//! commandId → the modules that receive it.
//!
//! Built once from the configuration: the global `filters` allow-list, then
//! each module's own `filters`. A lookup is one hash probe and returns the
//! module indexes in configuration order (fan-out order).

use std::collections::{HashMap, HashSet};

use crate::config::{CommandId, ModuleConfig};

/// Routing table for one configuration.
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// commandId → indexes into the configuration's module list, ascending.
    routes: HashMap<CommandId, Vec<usize>>,
}

impl Router {
    /// `global` empty means "no allow-list": every module filter counts.
    pub fn new(global: &[CommandId], modules: &[ModuleConfig]) -> Router {
        let allowed: HashSet<CommandId> = global.iter().copied().collect();
        let mut routes: HashMap<CommandId, Vec<usize>> = HashMap::new();
        for (index, module) in modules.iter().enumerate() {
            for &id in &module.filters {
                if !allowed.is_empty() && !allowed.contains(&id) {
                    continue;
                }
                let targets = routes.entry(id).or_default();
                if targets.last() != Some(&index) {
                    targets.push(index);
                }
            }
        }
        Router { routes }
    }

    /// The modules subscribed to `id`, in configuration order; empty when
    /// the id is filtered out or nobody subscribes.
    pub fn route(&self, id: CommandId) -> &[usize] {
        self.routes.get(&id).map(Vec::as_slice).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HttpMethod;
    use std::time::Duration;

    fn module(name: &str, filters: &[i128]) -> ModuleConfig {
        ModuleConfig {
            name: name.into(),
            file: "x.conf".into(),
            uri: "http://127.0.0.1/".into(),
            method: HttpMethod::Post,
            filters: filters.iter().map(|&f| CommandId(f)).collect(),
            delay: Duration::ZERO,
            retrynum: 3,
            retry_delay: Duration::from_secs(1),
            rcv_timeout: Duration::from_secs(30),
            snd_timeout: Duration::from_secs(5),
            mode: crate::config::DeliveryMode::Ordered,
            concurrency: 64,
            order_key: None,
            dead_letter_topic: None,
            script: None,
            contract: Default::default(),
        }
    }

    #[test]
    fn fan_out_in_configuration_order() {
        let modules = [
            module("a", &[1, 2]),
            module("b", &[2, 3]),
            module("c", &[2]),
        ];
        let r = Router::new(&[], &modules);
        assert_eq!(r.route(CommandId(2)), &[0, 1, 2]);
        assert_eq!(r.route(CommandId(1)), &[0]);
        assert_eq!(r.route(CommandId(3)), &[1]);
        assert!(r.route(CommandId(4)).is_empty());
    }

    #[test]
    fn global_filters_are_an_allow_list() {
        let modules = [module("a", &[1, 2]), module("b", &[2, 99])];
        let r = Router::new(&[CommandId(1), CommandId(2)], &modules);
        assert_eq!(r.route(CommandId(2)), &[0, 1]);
        assert!(r.route(CommandId(99)).is_empty());
    }

    #[test]
    fn full_64_bit_range_ids_do_not_collide() {
        let big = u64::MAX as i128;
        let modules = [module("a", &[big]), module("b", &[-1])];
        let r = Router::new(&[], &modules);
        assert_eq!(r.route(CommandId(big)), &[0]);
        assert_eq!(r.route(CommandId(-1)), &[1]);
    }

    #[test]
    fn repeated_filter_lines_route_once() {
        let modules = [module("a", &[5, 5])];
        assert_eq!(Router::new(&[], &modules).route(CommandId(5)), &[0]);
    }
}
