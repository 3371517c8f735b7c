"""Spellings that are not a version number (manifest.VERSION_RULE), shared by the version-number tests."""

# Zero, negative, leading zeros, past the bound, non-ASCII digits (Arabic-Indic, fullwidth, superscript:
# str.isdigit() and int() take some of them), whitespace, signs, separators, other bases, empty.
NOT_VERSIONS = ["0", "00", "-1", "-0", "07", "0001", "1000000000", "9999999999", "1" + "0" * 40, "٣", "３", "²",
                "1٣", " 3", "3 ", "3\n", "\t3", "3\u00a0", "+3", "3_0", "3.0", "0x3", "1e3", "", "3@4"]
