"""The target model: loading, chat prompts, attention capture, function words, decoding, backends."""
