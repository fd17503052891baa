"""`lmserve serve ray`'s settings are written once: RayOptions' fields are the flags,
their defaults the flags' defaults."""

import argparse
import dataclasses

from lmserve.backends.ray import plugin
from lmserve.backends.ray.deployment import RAY_OPTIONS, RayOptions
from lmserve.core.config import SERVE_RAY


def test_the_flags_are_ray_options_fields_with_their_defaults():
    parser = argparse.ArgumentParser()
    plugin.lmserve_add_cli_options(command=SERVE_RAY, parser=parser)
    options = vars(parser.parse_args([]))
    assert set(options) == set(RAY_OPTIONS) == {field.name for field in dataclasses.fields(RayOptions)}
    assert RayOptions.from_options(options) == RayOptions()
    assert options == dataclasses.asdict(RayOptions())
