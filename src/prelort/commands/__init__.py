"""The work behind the longer ``prelort`` sub-commands, callable without argparse.

``prelort.cli`` parses the command line, checks the flags and turns errors into one line;
these modules do the rest. Each imports the numerics (torch, PEFT) only when called.
"""
