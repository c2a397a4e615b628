"""TODO(scaffold): replaced by the real implementation before landing."""
from pipeline.cli import UserError


def add_arguments(parser):
    pass


def main(args):
    raise UserError("'evaluate' is not implemented yet")
