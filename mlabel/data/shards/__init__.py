"""WebDataset tar shards: written from any format, read back as splits, streamed (issue 19).

A shard is a POSIX tar of samples in the WebDataset layout: the members of a sample share a key
(the member name up to its first dot) and follow each other: ``KEY.jpg`` (or .png ...: the image's
bytes as in the source, not re-encoded) and ``KEY.json``::

    {"labels": ["sea", "sunset"], "unknown": [], "path": "images/42.jpg"}

``labels`` are the positives; every label not listed takes the vocabulary's ``default``
(``negative``, or ``unknown`` for partial-label data, whose verified negatives are then listed
under ``negative``); ``unknown`` lists the exceptions when the default is negative. Beside the
shards, ``labels.json`` holds the vocabulary, the default and, per split, the shard files and
their sample counts.

Reading: :func:`read_wds_table` scans a split's shards once (headers and the small JSON members;
image bytes are skipped by seeking) into a :class:`~mlabel.data.tables.LabelTable` whose
``members`` (:class:`ShardMembers`) locate each image inside its shard. Training streams them with
:class:`ShardStream`; evaluation reads members by offset in table order.

The package: :mod:`.read` (vocabulary, index, scan, a split as a table), :mod:`.write`
(``mlabel data shard``), :mod:`.stream` (training's shard stream), :mod:`.index` (the index's
checks); :mod:`mlabel.data.members` locates and reads one image inside a shard.
"""
from __future__ import annotations

from ..http import is_url
from ..members import NamedBytes, ShardMembers, ShardPaths, member_bytes, read_member
from .read import (VOCABULARY, Vocabulary, expand_braces, read_vocabulary, read_wds_table, shard_files,
                   shard_image_bytes)
from .stream import ShardLoader, ShardStream, StreamOptions, StreamProblem, stream_plan
from .write import write_shards

__all__ = ["NamedBytes", "ShardLoader", "ShardMembers", "ShardPaths", "ShardStream", "StreamOptions", "StreamProblem", "VOCABULARY",
           "Vocabulary", "expand_braces", "is_url", "member_bytes", "read_member", "read_vocabulary",
           "read_wds_table", "shard_files", "shard_image_bytes", "stream_plan", "write_shards"]
