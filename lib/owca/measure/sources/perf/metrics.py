"""The metrics a task's perf counts become: each event's counter in its metric's
unit, the multiplexing scaling factors, and ratios from the deltas between two
cycles."""

SCALING_FACTOR_AVG = 'task_scaling_factor_avg'
SCALING_FACTOR_MAX = 'task_scaling_factor_max'
DERIVE_INPUTS = {'task_instructions', 'task_cycles', 'task_cache_misses',
                 'task_cache_references'}
DERIVED_METRICS = ('task_ipc', 'task_ips', 'task_cache_hit_ratio',
                   'task_cache_misses_per_kilo_instructions')


def counter_metrics(record, events):
    """The metrics of one record; {} when some CPU's counts are unknown
    (absent rather than an undercount)."""
    if record.cpus_unknown:
        return {}
    metrics = {event.metric: value * event.scale if event.scale != 1 else value
               for event, value in zip(events, record.values, strict=True)}
    if record.cpus_counted:
        metrics[SCALING_FACTOR_AVG] = record.scale_avg
        metrics[SCALING_FACTOR_MAX] = record.scale_max
    return metrics


def derive(previous, current, elapsed_seconds):
    """Ratios over one cycle from two counter samples of the same task.

    A ratio is absent when an input is missing, a counter went backwards
    (restart), or its denominator did not move.
    """
    def delta(metric):
        if metric in previous and metric in current and current[metric] >= previous[metric]:
            return current[metric] - previous[metric]
        return None

    derived = {}
    instructions = delta('task_instructions')
    cycles = delta('task_cycles')
    misses = delta('task_cache_misses')
    references = delta('task_cache_references')
    if instructions is not None and cycles:
        derived['task_ipc'] = instructions / cycles
    if instructions is not None and elapsed_seconds > 0:
        derived['task_ips'] = instructions / elapsed_seconds
    if misses is not None and references:
        derived['task_cache_hit_ratio'] = (references - misses) / references
    if misses is not None and instructions:
        derived['task_cache_misses_per_kilo_instructions'] = misses * 1000 / instructions
    return derived
