// Load an artifacts folder once, generate one image, write it with its parameters. Errors are one line.
#include <iostream>

#include <ldm_rt/native/pipeline.hpp>

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: service MODEL_DIR PROMPT SEED OUT.png\n";
    return 2;
  }
  try {
    auto pipe = ldm_rt::native::Pipeline::load({argv[1]});
    ldm_rt::native::Request request;
    request.prompts = {argv[2]};
    request.seed = std::stoull(argv[3]);
    request.steps = 10;
    for (const auto& path : pipe->generate(request).save(argv[4])) std::cout << path << "\n";
  } catch (const ldm_rt::native::Error& e) {  // bad input or artifacts: the runtime's one-line message
    std::cerr << "service: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {  // anything else is a bug (or a SEED that is not a number)
    std::cerr << "service: internal error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
