"""Checks of config values shared by the stages and data modules (their errors name the config key)."""

import math


def is_finite_number(value) -> bool:
    """An int or float (not a bool, not a string from a YAML typo) that is neither NaN nor infinite."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def is_whole_number(value) -> bool:
    """An int, not a bool (True is an int to Python, but no count) nor a float or string from a YAML typo."""
    return isinstance(value, int) and not isinstance(value, bool)


def refuse_changed_settings(changed: list[str]) -> None:
    """A resume whose data settings differ from its checkpoint's (`changed`: "<key> (was x, now y)" each)
    is refused: the loader's position in the checkpoint means nothing under other settings."""
    if changed:
        raise ValueError(f"the checkpoint was saved with other data settings: {'; '.join(changed)}. Resume with "
                         "the original data settings, or start a new run (without ckpt_path)")
