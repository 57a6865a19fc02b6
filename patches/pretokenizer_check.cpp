#include "unicode.h"
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>
// Checks patches/*/0001-deepseek-v3-pretokenizer-no-recursion.patch: compiled once against the engine's original
// unicode.cpp and once against the patched one (tests/test_engine_patches.py), it reads hex-encoded UTF-8 lines
// and prints the byte lengths of the words the deepseek-v3 pre-tokenizer splits each into; both must print the same.
int main() {
    std::vector<std::string> exprs = {
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    };
    std::string line;
    while (std::getline(std::cin, line)) {
        std::string text;
        for (size_t i = 0; i + 1 < line.size(); i += 2) text += (char) std::stoi(line.substr(i, 2), nullptr, 16);
        auto words = unicode_regex_split(text, exprs, false);
        for (auto & w : words) printf("%zu,", w.size());
        printf("\n");
    }
}
