"""Parameter mappings between our Flax trees and transformers' state dicts, one table per tower."""
