"""Drawing training batches from several tasks: at each step a task is drawn, seeded, with probability

    proportional   p_t = n_t / sum n                  (n_t: the task's number of batches; every batch as often)
    temperature    p_t = n_t^(1/T) / sum n^(1/T)      (T = 1 is proportional; larger T moves toward uniform, so
                                                       small tasks are seen more often, e.g. T = 2 or 5 as in
                                                       multilingual training)

and that task's next batch is taken, its batches starting over (a shuffling DataLoader reshuffles) when used up."""
import math
import random
from collections.abc import Iterator

STRATEGIES = ("proportional", "temperature")


def sampling_probabilities(sizes: dict[str, int], strategy: str = "proportional",
                           temperature: float | None = None) -> dict[str, float]:
    """Task -> the probability that a step draws it, from the tasks' numbers of batches."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "proportional" and temperature is not None:
        raise ValueError(f"temperature applies to strategy='temperature' only, got temperature={temperature!r} with "
                         "strategy='proportional'")
    if strategy == "temperature" and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                      or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"temperature must be a finite number > 0 for strategy='temperature', got {temperature!r}")
    power = 1.0 if strategy == "proportional" else 1.0 / temperature
    scores = {task: n ** power for task, n in sizes.items()}
    return {task: score / sum(scores.values()) for task, score in scores.items()}


def task_batches(datasets: dict, strategy: str = "proportional", temperature: float | None = None,
                 num_batches: int | None = None, seed: int = 0) -> Iterator[tuple[str, object]]:
    """(task, batch) pairs, `num_batches` of them (default: as many as all tasks have together), from `datasets`
    (task -> its batches: a list, a DataLoader, anything with len() that can be iterated again)."""
    if not isinstance(datasets, dict) or not datasets:
        raise ValueError(f"datasets must be a non-empty dict of task name -> batches, got {datasets!r}")
    sizes = {}
    for task, batches in datasets.items():
        try:
            sizes[task] = len(batches)
        except TypeError:
            raise TypeError(f"datasets[{task!r}] must have a length (a list of batches, a DataLoader), got "
                            f"{type(batches).__name__}") from None
        if sizes[task] < 1:
            raise ValueError(f"datasets[{task!r}] has no batches")
    probabilities = sampling_probabilities(sizes, strategy, temperature)
    if num_batches is None:
        num_batches = sum(sizes.values())
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1 (or None: one pass's worth), got {num_batches!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return _draw(datasets, list(probabilities), list(probabilities.values()), num_batches, random.Random(seed))


def _draw(datasets: dict, tasks: list[str], weights: list[float], num_batches: int, rng: random.Random):
    iterators = {}
    for task in rng.choices(tasks, weights=weights, k=num_batches):
        try:
            batch = next(iterators[task])
        except (KeyError, StopIteration):  # first use, or used up: start the task's batches over
            iterators[task] = iter(datasets[task])
            batch = next(iterators[task])
        yield task, batch
