// spm_ref.cpp - test-only reference: encodes lines with Debian's
// libsentencepiece (C++) so test_tok_spm.c can compare against it.
//   spm_ref MODEL INPUT OUTPUT
// INPUT holds one text per line with escapes \\ \n \t \r; OUTPUT gets, per
// input line, the ids (no BOS) separated by spaces. Single-threaded.
#include <sentencepiece_processor.h>

#include <fstream>
#include <iostream>
#include <string>
#include <vector>

static std::string unescape(const std::string &s)
{
    std::string o;
    for (size_t i = 0; i < s.size(); i++) {
        if (s[i] != '\\' || i + 1 == s.size()) {
            o += s[i];
            continue;
        }
        char c = s[++i];
        o += c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c;
    }
    return o;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        std::cerr << "usage: spm_ref MODEL INPUT OUTPUT\n";
        return 2;
    }
    sentencepiece::SentencePieceProcessor sp;
    const auto st = sp.Load(argv[1]);
    if (!st.ok()) {
        std::cerr << "spm_ref: " << st.ToString() << "\n";
        return 1;
    }
    std::ifstream in(argv[2], std::ios::binary);
    std::ofstream out(argv[3], std::ios::binary);
    std::string line;
    while (std::getline(in, line)) {
        std::vector<int> ids;
        if (!sp.Encode(unescape(line), &ids).ok())
            return 1;
        for (size_t i = 0; i < ids.size(); i++)
            out << (i ? " " : "") << ids[i];
        out << "\n";
    }
    return out.good() ? 0 : 1;
}
